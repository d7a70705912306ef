"""The backbone families (``model.pretrained.name``) in one table: their released sizes (``model_type``), patch sizes,
how their ViTs differ and where their weights come from. The options check names against it (config/schema.py),
model/vit.py builds the ViTs from it and model/weights.py finds the official weight files in it.

Every value is read from the official repositories: facebookresearch/dino (``vision_transformer.py``,
``hubconf.py``), facebookresearch/dinov2 and facebookresearch/dinov3 (``hub/backbones.py`` and
``models/vision_transformer.py`` of each). The options import this module, so it needs no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, kw_only=True)
class Size:
    """The ViT of one released size (``model.pretrained.model_type``), as the family's constructor builds it."""

    width: int  # embed_dim
    depth: int  # transformer blocks
    num_heads: int  # attention heads
    ffn_ratio: float  # feed-forward width / embed_dim: DINO's and DINOv2's mlp_ratio, DINOv3's ffn_ratio
    swiglu: bool  # the feed-forward layer is a SwiGLU (DINOv2's ffn_layer="swiglufused", DINOv3's "swiglu")


@dataclass(frozen=True, kw_only=True)
class Family:
    """A backbone family (``model.pretrained.name``): its sizes, its patch sizes, how its ViT differs from the other
    families' and where its weights come from."""

    label: str  # ours: how messages name it
    sizes: dict[str, Size]  # model_type -> the released size; the constructors' names are in the table's comments
    patch_sizes: tuple[int, ...]  # the patch sizes of its released weights (the hub functions' names)
    norm_eps: float  # LayerNorm eps of every norm layer (the constructors' norm_layer)
    layer_scale: bool  # LayerScale (ls1, ls2) on each block's outputs: DINOv2's init_values, DINOv3's layerscale_init
    registers: int  # DINOv2's register tokens (register_tokens) after the CLS token: num_register_tokens
    storage_tokens: int  # DINOv3's storage tokens (storage_tokens) after the CLS token: n_storage_tokens
    position: str  # "learned": a position embedding, resized to the image; "rope": rotary, in every attention
    pretrain_img_size: int  # the image size the learned position embedding covers: img_size
    pos_offset: float  # added to the target grid when resizing by scale factor (interpolate_offset); 0: to the size
    pos_antialias: bool  # the resize antialiases (interpolate_antialias)
    pos_in_fp32: bool  # the resize runs in float32, the sum in the tokens' dtype (DINOv2's interpolate_pos_encoding)
    rope_base: Optional[float]  # RoPE periods: base ** (2 i / (head_dim / 2)) (pos_embed_rope_base); None: no RoPE
    masked_k_bias: bool  # the key part of the qkv bias is multiplied by the bias_mask buffer (mask_k_bias)
    mask_token: bool  # the official state dict holds a mask_token, a parameter of the family's pretraining only
    fused_swiglu: bool  # the SwiGLU keeps w1 and w2 as one layer, w12 (DINOv2's SwiGLUFFNFused)
    weights_url: Optional[str]  # the hub's download folder of the weight files; None: not downloadable
    weights_page: Optional[str]  # where weight files that are not downloadable are requested (the README)
    weights: dict[tuple[str, int], str]  # (model_type, patch size) -> the hub's weight file, below weights_url

    @property
    def widths(self) -> dict[str, int]:
        """model_type -> width."""
        return {name: size.width for name, size in self.sizes.items()}


_DINOV2_SIZES = {  # hub/backbones.py: dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14 (and their _reg)
    "vit_small": Size(width=384, depth=12, num_heads=6, ffn_ratio=4.0, swiglu=False),
    "vit_base": Size(width=768, depth=12, num_heads=12, ffn_ratio=4.0, swiglu=False),
    "vit_large": Size(width=1024, depth=24, num_heads=16, ffn_ratio=4.0, swiglu=False),
    "vit_giant2": Size(width=1536, depth=40, num_heads=24, ffn_ratio=4.0, swiglu=True),
}

BACKBONES = {
    "dino": Family(
        label="DINO",
        sizes={  # vision_transformer.py: vit_tiny, vit_small, vit_base
            "vit_tiny": Size(width=192, depth=12, num_heads=3, ffn_ratio=4.0, swiglu=False),
            "vit_small": Size(width=384, depth=12, num_heads=6, ffn_ratio=4.0, swiglu=False),
            "vit_base": Size(width=768, depth=12, num_heads=12, ffn_ratio=4.0, swiglu=False),
        },
        patch_sizes=(8, 16), norm_eps=1e-6, layer_scale=False, registers=0, storage_tokens=0,
        position="learned", pretrain_img_size=224, pos_offset=0.1,  # the 0.1 offset: dino issue #8
        pos_antialias=False, pos_in_fp32=False, rope_base=None, masked_k_bias=False, mask_token=False,
        fused_swiglu=False, weights_url="https://dl.fbaipublicfiles.com/dino/", weights_page=None,
        weights={  # hubconf.py: dino_vits16, dino_vits8, dino_vitb16, dino_vitb8 (no vit_tiny was released)
            ("vit_small", 16): "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
            ("vit_small", 8): "dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth",
            ("vit_base", 16): "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            ("vit_base", 8): "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        },
    ),
    "dinov2": Family(
        label="DINOv2", sizes=_DINOV2_SIZES, patch_sizes=(14,), norm_eps=1e-6, layer_scale=True, registers=0,
        storage_tokens=0, position="learned", pretrain_img_size=518, pos_offset=0.1, pos_antialias=False,
        pos_in_fp32=True, rope_base=None, masked_k_bias=False, mask_token=True, fused_swiglu=True,
        weights_url="https://dl.fbaipublicfiles.com/dinov2/", weights_page=None,
        weights={
            ("vit_small", 14): "dinov2_vits14/dinov2_vits14_pretrain.pth",
            ("vit_base", 14): "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
            ("vit_large", 14): "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
            ("vit_giant2", 14): "dinov2_vitg14/dinov2_vitg14_pretrain.pth",
        },
    ),
    "dinov2_reg": Family(  # the same models with 4 registers; they resize the position embedding to the size
        label="DINOv2 with registers", sizes=_DINOV2_SIZES, patch_sizes=(14,), norm_eps=1e-6, layer_scale=True,
        registers=4, storage_tokens=0, position="learned", pretrain_img_size=518, pos_offset=0.0,
        pos_antialias=True, pos_in_fp32=True, rope_base=None, masked_k_bias=False, mask_token=True,
        fused_swiglu=True, weights_url="https://dl.fbaipublicfiles.com/dinov2/", weights_page=None,
        weights={
            ("vit_small", 14): "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
            ("vit_base", 14): "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
            ("vit_large", 14): "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
            ("vit_giant2", 14): "dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth",
        },
    ),
    "dinov3": Family(
        label="DINOv3",
        sizes={  # hub/backbones.py: dinov3_vits16, dinov3_vits16plus, dinov3_vitb16, dinov3_vitl16, dinov3_vith16plus
            "vit_small": Size(width=384, depth=12, num_heads=6, ffn_ratio=4.0, swiglu=False),
            "vit_small_plus": Size(width=384, depth=12, num_heads=6, ffn_ratio=6.0, swiglu=True),
            "vit_base": Size(width=768, depth=12, num_heads=12, ffn_ratio=4.0, swiglu=False),
            "vit_large": Size(width=1024, depth=24, num_heads=16, ffn_ratio=4.0, swiglu=False),
            "vit_huge_plus": Size(width=1280, depth=32, num_heads=20, ffn_ratio=6.0, swiglu=True),
        },
        patch_sizes=(16,), norm_eps=1e-5,  # norm_layer="layernormbf16": a LayerNorm with eps 1e-5
        layer_scale=True, registers=0, storage_tokens=4, position="rope", pretrain_img_size=224, pos_offset=0.0,
        pos_antialias=False, pos_in_fp32=False, rope_base=100.0, masked_k_bias=True, mask_token=True,
        fused_swiglu=False, weights_url=None,  # distributed only after accepting Meta's DINOv3 licence
        weights_page="https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/",
        weights={  # the LVD-1689M releases, as the hub names them
            ("vit_small", 16): "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
            ("vit_small_plus", 16): "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
            ("vit_base", 16): "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
            ("vit_large", 16): "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
            ("vit_huge_plus", 16): "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
        },
    ),
}
BACKBONE_WIDTH = BACKBONES["dino"].widths  # DINO's vision_transformer.py
