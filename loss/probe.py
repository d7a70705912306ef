"""The probes' cross-entropy: the linear probe's on the labels (both stages), and the self-training student's on the
teacher's cluster maps (engine/self_training.py), with the bilinear upsampling of the logits to the labels' size."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.distributed import ONE_PROCESS, World


def probe_cross_entropy(logits: Tensor, label: Tensor, n_classes: int, world: World = ONE_PROCESS,
                        class_weight: Optional[Tensor] = None) -> Tensor:
    """A probe's loss: logits upsampled to the label size, pixels labelled outside 0..n_classes-1 (unlabelled,
    or not confident enough for a pseudo-label) ignored; the mean over the counted pixels of the global batch (with
    several processes, this process's part of it). ``class_weight`` (n_classes): each pixel's loss weighted by its
    class's weight, the mean then weighted too (the sum divided by the global batch's sum of the weights)."""
    logits = upsample(logits, label.shape[-2:])
    valid = (label >= 0) & (label < n_classes)
    counted = int(world.sum(valid.sum()))
    if not counted:  # an unlabelled batch teaches the probe nothing (the original returned NaN)
        return logits.sum() * 0.0
    if class_weight is None:
        return F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], label[valid], reduction="sum") / counted
    weight = class_weight.to(logits.dtype)[label[valid]]
    losses = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], label[valid], reduction="none")
    return (weight * losses).sum() / world.sum(weight.sum().detach()).clamp_min(torch.finfo(weight.dtype).tiny)


def upsample(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of N x C x h x w logits to ``size`` (``F.interpolate``, align_corners False).

    With deterministic algorithms on (``deterministic: true``), as two products with the interpolation weights: the
    same values up to float rounding, with a backward pass that repeats bit for bit on CUDA, where PyTorch has no
    deterministic kernel for the backward of ``F.interpolate``'s bilinear mode."""
    if not torch.are_deterministic_algorithms_enabled():
        return F.interpolate(logits, size, mode="bilinear", align_corners=False)
    rows = bilinear_weights(logits.shape[-2], size[0]).to(logits.device, logits.dtype)
    cols = bilinear_weights(logits.shape[-1], size[1]).to(logits.device, logits.dtype)
    return rows @ logits @ cols.T


def bilinear_weights(n_in: int, n_out: int) -> Tensor:
    """The n_out x n_in matrix of 1-D bilinear interpolation with half-pixel centres (align_corners False): output
    i reads the input at (i + 0.5) * n_in / n_out - 0.5, clamped at 0, from its two neighbours (the last one
    repeated at the border), as PyTorch's kernel does."""
    source = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0.0)
    low = source.floor().long().clamp_max(n_in - 1)
    high = (low + 1).clamp_max(n_in - 1)
    frac = source - low
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights
