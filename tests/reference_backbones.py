"""Independent reference forward passes of the official DINOv2 / DINOv3 ViT backbones.

Tests use this module to check our own ViT implementation against the official
models without importing the official repositories (facebookresearch/dinov2 and
facebookresearch/dinov3) or downloading any weights:

* ``official_state_dict`` generates random weights in exactly the layout
  (keys, shapes, float32 dtype, buffer values) that the official hub models
  (``dinov2_vits14``, ``dinov2_vits14_reg``, ``dinov3_vits16``, ...) have in
  ``model.state_dict()``, optionally with fewer blocks so tests stay small.
* ``reference_patch_tokens`` recomputes, in plain float32 PyTorch and with eval
  semantics, what the official ``forward_features(img)["x_norm_patchtokens"]``
  returns for a model loaded with such a state dict.

The code here was written from reading the official sources and checked against
them (strict ``load_state_dict`` plus forward comparison at square and
non-square input sizes), but deliberately shares no code with them or with the
implementation under test: attention is an explicit softmax, RoPE and the
position-embedding interpolation are spelled out.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

__all__ = ["ARCHS", "official_state_dict", "reference_patch_tokens"]


def _arch(embed_dim, depth, num_heads, ffn, ffn_ratio, patch):
    return {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "ffn": ffn,
        "ffn_ratio": ffn_ratio,
        "patch": patch,
    }


_DINOV2_ARCHS = {
    "vit_small": _arch(384, 12, 6, "mlp", 4.0, 14),
    "vit_base": _arch(768, 12, 12, "mlp", 4.0, 14),
    "vit_large": _arch(1024, 24, 16, "mlp", 4.0, 14),
    # dinov2_vitg14 uses ffn_layer="swiglufused": one fused w12 projection.
    "vit_giant2": _arch(1536, 40, 24, "swiglu", 4.0, 14),
}

# Taken from the dinov3_vit*16* hub functions (dinov3/hub/backbones.py).
_DINOV3_ARCHS = {
    "vit_small": _arch(384, 12, 6, "mlp", 4.0, 16),
    "vit_small_plus": _arch(384, 12, 6, "swiglu", 6.0, 16),
    "vit_base": _arch(768, 12, 12, "mlp", 4.0, 16),
    "vit_large": _arch(1024, 24, 16, "mlp", 4.0, 16),
    "vit_huge_plus": _arch(1280, 32, 20, "swiglu", 6.0, 16),
}

ARCHS: dict = {
    **{("dinov2", k): dict(v) for k, v in _DINOV2_ARCHS.items()},
    **{("dinov2_reg", k): dict(v) for k, v in _DINOV2_ARCHS.items()},
    **{("dinov3", k): dict(v) for k, v in _DINOV3_ARCHS.items()},
}

# Family-wide settings of the hub constructors (not per model size).
_FAMILY = {
    # img_size=518 / patch 14 -> 37x37 learned position grid; hub default
    # interpolate_offset=0.1 with plain (non-antialiased) bicubic.
    "dinov2": {
        "img_size": 518,
        "n_extra": 0,
        "ln_eps": 1e-6,
        "interp_offset": 0.1,
        "interp_antialias": False,
    },
    # The _reg hub functions switch to an explicit output size + antialias.
    "dinov2_reg": {
        "img_size": 518,
        "n_extra": 4,
        "ln_eps": 1e-6,
        "interp_offset": 0.0,
        "interp_antialias": True,
    },
    # norm_layer="layernormbf16" is nn.LayerNorm with eps=1e-5; 4 storage tokens.
    "dinov3": {"img_size": 224, "n_extra": 4, "ln_eps": 1e-5, "rope_base": 100.0},
}


def _config(family: str, model_type: str) -> tuple[dict, dict]:
    if (family, model_type) not in ARCHS:
        raise KeyError(
            f"unknown backbone {family!r} / {model_type!r}; known: {sorted(ARCHS)}"
        )
    return ARCHS[(family, model_type)], _FAMILY[family]


def _ffn_hidden(arch: dict) -> int:
    # Both repos first take int(dim * ratio) in the block, then their SwiGLU
    # layers shrink it by 2/3 and round up to a multiple of 8 (dinov2 writes
    # (d + 7) // 8 * 8, dinov3 d + (-d % 8): the same number).
    hidden = int(arch["embed_dim"] * arch["ffn_ratio"])
    if arch["ffn"] == "mlp":
        return hidden
    d = int(hidden * 2 / 3)
    return (d + 7) // 8 * 8


# ---------------------------------------------------------------------------
# State dict layout and random weights
# ---------------------------------------------------------------------------


def _layout(family: str, model_type: str, depth: int) -> list[tuple[str, tuple, str]]:
    """(key, shape, kind) in the order the official model.state_dict() lists them."""
    arch, fam = _config(family, model_type)
    d, p = arch["embed_dim"], arch["patch"]
    h = _ffn_hidden(arch)
    head_dim = d // arch["num_heads"]
    out = []

    def linear(name, n_out, n_in, bias_mask=False):
        out.append((f"{name}.weight", (n_out, n_in), "linear"))
        out.append((f"{name}.bias", (n_out,), "bias"))
        if bias_mask:
            out.append((f"{name}.bias_mask", (n_out,), "bias_mask"))

    def norm(name):
        out.append((f"{name}.weight", (d,), "norm_weight"))
        out.append((f"{name}.bias", (d,), "bias"))

    # Module-level parameters come first (registration order), then children.
    out.append(("cls_token", (1, 1, d), "token"))
    if family == "dinov3":
        out.append(("storage_tokens", (1, fam["n_extra"], d), "token"))
    else:
        grid = fam["img_size"] // p
        out.append(("pos_embed", (1, 1 + grid * grid, d), "token"))
        if fam["n_extra"]:
            out.append(("register_tokens", (1, fam["n_extra"], d), "token"))
    out.append(("mask_token", (1, d), "token"))
    out.append(("patch_embed.proj.weight", (d, 3, p, p), "conv"))
    out.append(("patch_embed.proj.bias", (d,), "bias"))
    if family == "dinov3":
        out.append(("rope_embed.periods", (head_dim // 4,), "periods"))

    for i in range(depth):
        b = f"blocks.{i}"
        norm(f"{b}.norm1")
        linear(f"{b}.attn.qkv", 3 * d, d, bias_mask=family == "dinov3")
        linear(f"{b}.attn.proj", d, d)
        out.append((f"{b}.ls1.gamma", (d,), "gamma"))
        norm(f"{b}.norm2")
        if arch["ffn"] == "mlp":
            linear(f"{b}.mlp.fc1", h, d)
            linear(f"{b}.mlp.fc2", d, h)
        elif family.startswith("dinov2"):
            linear(f"{b}.mlp.w12", 2 * h, d)
            linear(f"{b}.mlp.w3", d, h)
        else:
            linear(f"{b}.mlp.w1", h, d)
            linear(f"{b}.mlp.w2", h, d)
            linear(f"{b}.mlp.w3", d, h)
        out.append((f"{b}.ls2.gamma", (d,), "gamma"))
    norm("norm")
    return out


def _rope_periods(head_dim: int, base: float) -> torch.Tensor:
    # Same expression as RopePositionEmbedding._init_weights (fp32), so the
    # buffer is bit-identical to a freshly built official model.
    exponent = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return base**exponent


def official_state_dict(
    family: str, model_type: str, depth: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random float32 weights with the exact keys/shapes of the official hub model.

    ``depth`` overrides the number of transformer blocks. Values are chosen so
    that every parameter visibly affects the output (nonzero biases, LayerNorm
    affine away from identity, LayerScale far from its 1e-5 / 1.0 init) while
    activations stay O(1): weights use std fan_in**-0.5, which also makes the
    attention logits O(1) so that softmax and RoPE matter.
    """
    arch, fam = _config(family, model_type)
    depth = arch["depth"] if depth is None else int(depth)
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    gen = torch.Generator().manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    sd = {}
    for key, shape, kind in _layout(family, model_type, depth):
        if kind == "token":
            t = randn(shape, 0.5)
        elif kind == "conv":
            t = randn(shape, (shape[1] * shape[2] * shape[3]) ** -0.5)
        elif kind == "linear":
            t = randn(shape, shape[1] ** -0.5)
        elif kind == "bias":
            t = randn(shape, 0.05)
        elif kind == "norm_weight":
            t = 1.0 + randn(shape, 0.1)
        elif kind == "gamma":
            t = 0.1 + 0.9 * torch.rand(shape, generator=gen, dtype=torch.float32)
        elif kind == "periods":
            t = _rope_periods(shape[0] * 4, fam["rope_base"])
        elif kind == "bias_mask":
            # init_weights_vit: ones with the key third zeroed, so k never gets
            # a bias. Not a no-op: with RoPE a k bias would rotate per position.
            t = torch.ones(shape, dtype=torch.float32)
            t[shape[0] // 3 : 2 * shape[0] // 3] = 0.0
        else:  # pragma: no cover - layout and filler are kept in sync
            raise AssertionError(kind)
        sd[key] = t.contiguous()
    return sd


# ---------------------------------------------------------------------------
# Reference forward
# ---------------------------------------------------------------------------


def _depth_of(sd: dict) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(
            f"state dict has no contiguous blocks.N.* keys (found {sorted(ids)})"
        )
    return len(ids)


def _layer_norm(x, sd, name, eps):
    return F.layer_norm(
        x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps
    )


def _linear(x, sd, name, bias_mask=False):
    bias = sd[f"{name}.bias"]
    if bias_mask:
        bias = bias * sd[f"{name}.bias_mask"]
    return x @ sd[f"{name}.weight"].t() + bias


def _rotate_half(x):
    # Pairs dimension i with i + D/2 (halves layout, not interleaved pairs).
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _attention(x, sd, name, num_heads, rope=None, bias_mask=False):
    B, N, C = x.shape
    head_dim = C // num_heads
    qkv = _linear(x, sd, f"{name}.qkv", bias_mask=bias_mask)
    # qkv features are ordered (3, heads, head_dim); q, k, v: [B, heads, N, hd].
    q, k, v = qkv.view(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    if rope is not None:
        # RoPE rotates only the trailing patch tokens; CLS/storage tokens
        # (the first N - HW) pass through unrotated.
        sin, cos = rope
        n_prefix = N - sin.shape[0]

        def rotate(t):
            pre, patches = t[:, :, :n_prefix], t[:, :, n_prefix:]
            return torch.cat((pre, patches * cos + _rotate_half(patches) * sin), dim=2)

        q, k = rotate(q), rotate(k)
    logits = (q @ k.transpose(-2, -1)) * head_dim**-0.5
    out = logits.softmax(dim=-1) @ v  # [B, heads, N, hd]
    out = out.transpose(1, 2).reshape(B, N, C)
    return _linear(out, sd, f"{name}.proj")


def _ffn(x, sd, name, ffn, family):
    if ffn == "mlp":
        # nn.GELU() default: exact erf form, not the tanh approximation.
        return _linear(F.gelu(_linear(x, sd, f"{name}.fc1")), sd, f"{name}.fc2")
    if family.startswith("dinov2"):
        # Fused projection: first half is the gate, second half the value.
        gate, value = _linear(x, sd, f"{name}.w12").chunk(2, dim=-1)
    else:
        gate, value = _linear(x, sd, f"{name}.w1"), _linear(x, sd, f"{name}.w2")
    return _linear(F.silu(gate) * value, sd, f"{name}.w3")


def _block(x, sd, i, arch, family, eps, rope=None):
    b = f"blocks.{i}"
    attn = _attention(
        _layer_norm(x, sd, f"{b}.norm1", eps),
        sd,
        f"{b}.attn",
        arch["num_heads"],
        rope=rope,
        bias_mask=family == "dinov3",
    )
    x = x + attn * sd[f"{b}.ls1.gamma"]
    ffn = _ffn(
        _layer_norm(x, sd, f"{b}.norm2", eps), sd, f"{b}.mlp", arch["ffn"], family
    )
    return x + ffn * sd[f"{b}.ls2.gamma"]


def _dinov2_pos_embed(pos_embed, rows, cols, H, W, offset, antialias):
    """Position embedding for a rows x cols patch grid, as interpolate_pos_encoding."""
    n_grid = pos_embed.shape[1] - 1
    # The official shortcut needs both the same token count AND a square
    # image; otherwise it interpolates even to the native 37x37 grid, and with
    # the 0.1 offset that is NOT the identity.
    if rows * cols == n_grid and H == W:
        return pos_embed
    M = int(math.sqrt(n_grid))
    assert M * M == n_grid
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, M, M, dim).permute(0, 3, 1, 2)  # [1, dim, M(rows), M(cols)]
    if offset:
        # Legacy path: a scale factor slightly above rows/M. PyTorch uses the
        # given scale (not out/in) to place the samples, so this differs
        # numerically from size=(rows, cols).
        kwargs = {"scale_factor": ((rows + offset) / M, (cols + offset) / M)}
    else:
        kwargs = {"size": (rows, cols)}
    grid = F.interpolate(grid.float(), mode="bicubic", antialias=antialias, **kwargs)
    assert grid.shape[-2:] == (rows, cols)
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((cls_pos, grid), dim=1).to(pos_embed.dtype)


def _dinov3_rope(periods, rows, cols):
    """(sin, cos), each [rows*cols, head_dim], as RopePositionEmbedding.forward in eval."""
    dd = {"dtype": torch.float32, "device": periods.device}
    # "separate" normalisation: each axis is mapped to [-1, 1] on its own,
    # using patch centres.
    ys = torch.arange(0.5, rows, **dd) / rows
    xs = torch.arange(0.5, cols, **dd) / cols
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(
        rows * cols, 2
    )
    coords = 2.0 * coords - 1.0
    # [HW, 2, D/4] -> [HW, D/2] with all row angles before all column angles,
    # then repeated for the second half of head_dim (matches _rotate_half).
    angles = 2 * math.pi * coords[:, :, None] / periods.float()[None, None, :]
    angles = angles.reshape(rows * cols, -1).repeat(1, 2)
    return torch.sin(angles), torch.cos(angles)


def reference_patch_tokens(
    family: str,
    model_type: str,
    state_dict: dict,
    img: torch.Tensor,
    return_last_two: bool = False,
):
    """Official ``forward_features(img)["x_norm_patchtokens"]`` in eval mode, float32.

    img: (B, 3, H, W) with H and W multiples of the patch size (for DINOv3 a
    remainder is silently cropped, as officially). Returns
    (B, H//p * W//p, embed_dim). With ``return_last_two`` returns instead the full
    token sequences (prefix tokens included, before the final norm) after the
    second-to-last and after the last block.
    """
    arch, fam = _config(family, model_type)
    depth = _depth_of(state_dict)
    if return_last_two and depth < 2:
        raise ValueError("return_last_two needs at least 2 blocks")
    sd = {
        k: v.to(device=img.device, dtype=torch.float32) for k, v in state_dict.items()
    }
    if sd["cls_token"].shape[-1] != arch["embed_dim"]:
        raise ValueError(
            f"state dict embed_dim {sd['cls_token'].shape[-1]} != {arch['embed_dim']} for {model_type}"
        )
    x = img.float()
    B, _, H, W = x.shape
    p = arch["patch"]
    if family.startswith("dinov2") and (H % p or W % p):
        # DINOv2's PatchEmbed asserts this. DINOv3's has the assert commented
        # out, so there the strided conv silently drops the remainder rows /
        # columns and we do the same.
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    rows, cols = H // p, W // p
    eps = fam["ln_eps"]

    # Non-overlapping patches, flattened row-major (row index major).
    patches = F.conv2d(
        x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p
    )
    patches = patches.flatten(2).transpose(1, 2)  # [B, HW, D]

    rope = None
    if family == "dinov3":
        cls = sd["cls_token"] + 0 * sd["mask_token"]  # official no-mask path
        tokens = torch.cat(
            (cls.expand(B, -1, -1), sd["storage_tokens"].expand(B, -1, -1), patches),
            dim=1,
        )
        # Computed once: the official code recomputes it per block, but in
        # eval it is a pure function of the grid size.
        rope = _dinov3_rope(sd["rope_embed.periods"], rows, cols)
    else:
        tokens = torch.cat((sd["cls_token"].expand(B, -1, -1), patches), dim=1)
        tokens = tokens + _dinov2_pos_embed(
            sd["pos_embed"],
            rows,
            cols,
            H,
            W,
            fam["interp_offset"],
            fam["interp_antialias"],
        )
        if fam["n_extra"]:
            # Registers go in after the position embedding, so they get none.
            tokens = torch.cat(
                (tokens[:, :1], sd["register_tokens"].expand(B, -1, -1), tokens[:, 1:]),
                dim=1,
            )

    outputs = []
    for i in range(depth):
        tokens = _block(tokens, sd, i, arch, family, eps, rope=rope)
        outputs.append(tokens)
    if return_last_two:
        return outputs[-2], outputs[-1]
    normed = _layer_norm(tokens, sd, "norm", eps)
    return normed[:, 1 + fam["n_extra"] :]
