"""The DINO Vision Transformer, with the exact parameter names of the official DINO checkpoints.

Names (cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2},
norm) match facebookresearch/dino's vision_transformer.py, so official weights load with strict=True and no
renaming. Attention uses torch's scaled_dot_product_attention (the same function as DINO's explicit
softmax(q k^T * scale) v, computed by a fused kernel where one exists).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.config import BACKBONE_WIDTH

DEPTH = 12  # every DINO ViT has 12 blocks
NUM_HEADS = {"vit_tiny": 3, "vit_small": 6, "vit_base": 12}  # as DINO's vit_tiny / vit_small / vit_base
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6  # DINO: partial(nn.LayerNorm, eps=1e-6)
PRETRAIN_IMG_SIZE = 224  # pos_embed of the released checkpoints covers a 224 x 224 image
POS_EMBED_OFFSET = 0.1  # DINO adds 0.1 to the target grid before interpolating (dino issue #8)
INIT_STD = 0.02  # DINO's trunc_normal_ std for weights, pos_embed and cls_token


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5, as DINO
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = MLP_RATIO) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO's ViT without a classification head (DINO's ``num_classes=0``).

    It has no ``forward``: the PPAP network runs ``prepare_tokens`` and the blocks itself, because it needs the
    output of the second-to-last block as well as the last one.
    """

    def __init__(self, patch_size: int = 16, embed_dim: int = 384, depth: int = DEPTH, num_heads: int = 6,
                 img_size: int = PRETRAIN_IMG_SIZE) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_tokens: int, height: int, width: int) -> Tensor:
        """Position embedding for an image of ``height`` x ``width`` pixels, computed as DINO does.

        DINO resizes the pretrained grid with ``scale_factor=(h0 + 0.1) / sqrt(N)`` rather than ``size=``:
        bicubic interpolation then places its samples by that scale, so a plain ``size=`` resize would give
        different numbers than the official code at every resolution other than the pretraining one.
        """
        n = self.pos_embed.shape[1] - 1
        if num_tokens - 1 == n and height == width:
            return self.pos_embed
        side = int(math.sqrt(n))
        h0 = height // self.patch_size + POS_EMBED_OFFSET
        w0 = width // self.patch_size + POS_EMBED_OFFSET
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=(h0 / math.sqrt(n), w0 / math.sqrt(n)), mode="bicubic")
        if grid.shape[-2:] != (int(h0), int(w0)):
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(int(h0), int(w0))}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, img: Tensor) -> Tensor:
        """Patch embedding, CLS token and (interpolated) position embedding: (B, 1 + h*w, C)."""
        _, _, height, width = img.shape
        x = self.patch_embed(img)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x.shape[1], height, width)


def vit(model_type: str, patch_size: int, depth: int = DEPTH) -> VisionTransformer:
    """DINO's ``vit_tiny`` / ``vit_small`` / ``vit_base`` with the given patch size.

    ``depth`` is 12 for every released DINO model; tests build shallower ViTs where the depth does not matter.
    """
    return VisionTransformer(patch_size=patch_size, embed_dim=BACKBONE_WIDTH[model_type],
                             num_heads=NUM_HEADS[model_type], depth=depth)
