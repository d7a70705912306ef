"""The Vision Transformers of DINO, DINOv2 (plain and with registers) and DINOv3, with the exact parameter names of
their official checkpoints.

One ``VisionTransformer`` serves the four families; the families' table (config/families.py) says how they differ:
- DINO (facebookresearch/dino): learned position embedding for a 224-px grid, resized by scale factor with a 0.1
  offset (dino issue #8); LayerNorm eps 1e-6; GELU MLP; no LayerScale.
- DINOv2 (facebookresearch/dinov2, as its hub builds the models): learned position embedding for a 518-px grid
  (37 x 37 patches of 14 px), resized in float32 like DINO's (plain models) or to the target size with
  antialiasing (the ``_reg`` models); 4 register tokens after the CLS token (``_reg``), added after the position
  embedding; LayerScale; LayerNorm eps 1e-6; the giant uses a fused SwiGLU (``w12``, ``w3``).
- DINOv3 (facebookresearch/dinov3, its hub ViTs): no position embedding; axial rotary embedding (RoPE) of the patch
  tokens' rows and columns in every attention, in float32, coordinates normalised separately per axis; 4 storage
  tokens after the CLS token; the qkv layer's key bias masked out by its ``bias_mask`` buffer; LayerScale; LayerNorm
  eps 1e-5; the "plus" sizes use SwiGLU (``w1``, ``w2``, ``w3``). The hub models jitter and rescale the RoPE
  coordinates in training mode: augmentations of DINOv3's own pretraining, which PPAP's frozen backbone and its
  decoder must never apply, so this RoPE has none (it is the same in training and evaluation mode).

Attention uses torch's scaled_dot_product_attention (softmax(q k^T / sqrt(head_dim)) v, fused where a kernel exists).
The PPAP network runs ``prepare_tokens``, ``rope`` and the blocks itself, because it needs the output of the
second-to-last block as well as the last one; there is no ``forward``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from config import BACKBONES, Family, Size

Rope = Optional[tuple[Tensor, Tensor]]  # (sin, cos) of the patch tokens, (h*w, head_dim) each, or None

ARCHS = {(name, model_type): size  # (family, model_type) -> the official model's shape
         for name, family in BACKBONES.items() for model_type, size in family.sizes.items()}
INIT_STD = 0.02  # trunc_normal_ std of weights, position embedding and tokens in all three codebases
LAYER_SCALE_INIT = 1e-5


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MaskedKBiasLinear(nn.Linear):
    """DINOv3's qkv layer: its bias times ``bias_mask`` (1 for q and v, 0 for k), a buffer of the checkpoint."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__(dim, out)
        mask = torch.ones(out)
        mask[out // 3: 2 * out // 3] = 0.0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, masked_k_bias: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = MaskedKBiasLinear(dim, dim * 3) if masked_k_bias else nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Rope = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = _apply_rope(q, rope), _apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5, as all three
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def _apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate the patch tokens of ``x`` (B, heads, N, head_dim), in the rope's dtype (float32), as DINOv3 does;
    the tokens before them (CLS, storage) are left as they are."""
    sin, cos = rope
    prefix = x.shape[-2] - sin.shape[-2]
    patches = x[:, :, prefix:].to(sin.dtype)
    patches = (patches * cos + rotate_half(patches) * sin).to(x.dtype)
    return torch.cat((x[:, :, :prefix], patches), dim=-2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """silu(w1 x) * (w2 x) -> w3: DINOv3's layers w1, w2, w3, or DINOv2's w12 (w1 and w2 in one) and w3."""

    def __init__(self, dim: int, hidden: int, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.w12 = nn.Linear(dim, 2 * hidden)
        else:
            self.w1 = nn.Linear(dim, hidden)
            self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1) if self.fused else (self.w1(x), self.w2(x))
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden(dim: int, ffn_ratio: float, fused: bool) -> int:
    """SwiGLU width: two thirds of the MLP's, rounded up to a multiple of 8 (DINOv2 adds 7 first, as its code)."""
    two_thirds = int(int(dim * ffn_ratio) * 2 / 3)
    return (two_thirds + 7) // 8 * 8 if fused else two_thirds + (-two_thirds % 8)


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim: int, arch: Size, spec: Family) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=spec.norm_eps)
        self.attn = Attention(dim, arch.num_heads, spec.masked_k_bias)
        self.ls1 = LayerScale(dim) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=spec.norm_eps)
        hidden = int(dim * arch.ffn_ratio)
        if arch.swiglu:
            self.mlp = SwiGLU(dim, swiglu_hidden(dim, arch.ffn_ratio, spec.fused_swiglu), spec.fused_swiglu)
        else:
            self.mlp = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim) if spec.layer_scale else nn.Identity()

    def forward(self, x: Tensor, rope: Rope = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeEmbedding(nn.Module):
    """DINOv3's axial RoPE: sin and cos of 2 pi x / period for the row and the column coordinate of each patch, in
    [-1, 1] normalised separately per axis, without the coordinate augmentations of DINOv3's pretraining."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        quarter = head_dim // 4
        self.register_buffer("periods", base ** (2 * torch.arange(quarter, dtype=torch.float32) / (head_dim // 2)))

    def forward(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        device, dtype = self.periods.device, torch.float32
        rows = torch.arange(0.5, h, device=device, dtype=dtype) / h
        cols = torch.arange(0.5, w, device=device, dtype=dtype) / w
        coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # (hw, 2)
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # (hw, 2, head_dim / 4)
        angles = angles.flatten(1, 2).tile(2)  # (hw, head_dim): rows then columns, twice
        return torch.sin(angles), torch.cos(angles)


class VisionTransformer(nn.Module):
    """The backbone of one family and size, without a head (the official ``num_classes=0`` / ``nn.Identity``)."""

    def __init__(self, family: str = "dino", model_type: str = "vit_small", patch_size: int = 16,
                 depth: Optional[int] = None) -> None:
        super().__init__()
        spec = BACKBONES[family]
        arch = spec.sizes[model_type]
        if depth is not None:
            arch = dataclasses.replace(arch, depth=depth)
        embed_dim = arch.width
        self.family, self.spec = family, spec
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 + spec.registers + spec.storage_tokens  # CLS, then registers or storage tokens
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if spec.position == "learned":
            grid = spec.pretrain_img_size // patch_size
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        if spec.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, embed_dim))
        if spec.storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, spec.storage_tokens, embed_dim))
        if spec.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used by the family's pretraining only
        rotary = spec.position == "rope"
        self.rope_embed = RopeEmbedding(embed_dim // arch.num_heads, spec.rope_base) if rotary else None
        self.blocks = nn.ModuleList([Block(embed_dim, arch, spec) for _ in range(arch.depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=spec.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # a random start (pretrained_weights "none"); DINO's order of draws, so that its random ViTs stay the same
        for name in ("pos_embed", "cls_token", "register_tokens", "storage_tokens"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=INIT_STD)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, num_tokens: int, height: int, width: int) -> Tensor:
        """Position embedding (CLS first) for an image of ``height`` x ``width`` pixels, computed as the family's
        official code does.

        DINO and DINOv2 resize the pretrained grid with ``scale_factor=(h0 + 0.1) / sqrt(N)`` rather than
        ``size=``: bicubic interpolation then places its samples by that scale, so a plain ``size=`` resize would
        give different numbers at every resolution other than the pretraining one. DINOv2's ``_reg`` models
        resize to the size, with antialiasing.
        """
        n = self.pos_embed.shape[1] - 1
        if num_tokens - 1 == n and height == width:
            return self.pos_embed
        spec = self.spec
        side = int(math.sqrt(n))
        rows, cols = height // self.patch_size, width // self.patch_size
        pos_embed = self.pos_embed.float() if spec.pos_in_fp32 else self.pos_embed
        grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if spec.pos_offset:
            resize = {"scale_factor": ((rows + spec.pos_offset) / side, (cols + spec.pos_offset) / side)}
        else:
            resize = {"size": (rows, cols)}
        grid = F.interpolate(grid, mode="bicubic", antialias=spec.pos_antialias, **resize)
        if grid.shape[-2:] != (rows, cols):
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])
        return torch.cat((pos_embed[:, :1], grid), dim=1)

    def prepare_tokens(self, img: Tensor) -> Tensor:
        """Patch embedding and the tokens before the patches, with the (resized) position embedding where the family
        has one: (B, num_prefix_tokens + h*w, C)."""
        _, _, height, width = img.shape
        x = self.patch_embed(img)
        b = x.shape[0]
        if self.rope_embed is not None:  # DINOv3: CLS (plus 0 x the mask token, as its code), storage, patches
            cls = self.cls_token + 0 * self.mask_token
            return torch.cat((cls.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x), dim=1)
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        pos = self.interpolate_pos_encoding(x.shape[1], height, width)
        x = x + (pos.to(x.dtype) if self.spec.pos_in_fp32 else pos)
        if self.num_prefix_tokens > 1:  # DINOv2's registers come after the CLS token, without position embedding
            x = torch.cat((x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]), dim=1)
        return x

    def rope(self, height: int, width: int) -> Rope:
        """The rotary embedding of an image of ``height`` x ``width`` pixels for every block (None without RoPE)."""
        if self.rope_embed is None:
            return None
        return self.rope_embed(height // self.patch_size, width // self.patch_size)


def vit(model_type: str, patch_size: int, depth: Optional[int] = None, family: str = "dino") -> VisionTransformer:
    """The official ``model_type`` of ``family`` (DINO's ``vit_tiny`` / ``vit_small`` / ``vit_base``, ...) with the
    given patch size. ``depth`` defaults to the official one; tests build shallower ViTs where it does not matter."""
    return VisionTransformer(family, model_type, patch_size, depth)
