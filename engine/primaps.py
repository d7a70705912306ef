"""Principal mask proposals (PriMaPs, Hahn et al., TMLR 2024): an image's code cut into masks, one at a time, each
the patches similar to the one that lies furthest along the principal direction of the patches not yet taken.

``self_training.masks: "primaps"`` labels each mask by the teacher's cluster map (the most frequent cluster inside
it, as PriMaPs-EM labels its masks with the momentum prototypes) and ignores the pixels of no mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dataset.classes import IGNORE

COVERAGE = 0.95  # masks are proposed until this fraction of the patches is taken
SHARPNESS = 10.0  # a mask's similarities x this, clamped to [0, 1]: the mask, nearly binary


def median_filter3(x: Tensor) -> Tensor:
    """The 3 x 3 median of each N x h x w map, reflect-padded at the border (PriMaPs' median pool)."""
    padded = F.pad(x[None], (1, 1, 1, 1), mode="reflect" if min(x.shape[-2:]) > 1 else "replicate")[0]
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1)  # N x h x w x 3 x 3
    return windows.reshape(*x.shape, 9).median(-1).values


def principal_masks(code: Tensor, threshold: float = 0.4) -> Tensor:
    """(N + 1) x h x w mask scores of a C x h x w code: channel 0 the background, then N proposed masks.

    While less than ``COVERAGE`` of the patches is taken: the principal direction of the code of the patches not
    taken (centred, by SVD); the free patch whose unit code is most aligned with it, either way (the sign of a
    principal direction is arbitrary; PriMaPs takes a random one by its randomised PCA); the cosine similarity of every
    free patch to that patch's code, kept where at least ``threshold`` (the patch itself has 1), is the mask, and its
    patches are taken. The masks are median-filtered (3 x 3) and sharpened (x ``SHARPNESS``, clamped to [0, 1]); the
    background is the mean of the masks' non-zero values minus their sum, clamped to [0, 1] (0 where the filter left no
    mask: every pixel is then background). A dense CRF or a softmax of these scores gives each pixel its mask.
    """
    code = code.float()
    unit = F.normalize(code, dim=0)
    free = torch.ones(code.shape[1:], dtype=torch.bool, device=code.device)
    masks = []
    while (~free).float().mean() < COVERAGE:
        rows = code[:, free].T
        direction = torch.linalg.svd(rows - rows.mean(0), full_matrices=False).Vh[0]
        along = torch.einsum("c,chw->hw", direction, unit).abs().masked_fill(~free, -1.0)
        index = along.flatten().argmax()
        sim = torch.einsum("c,chw->hw", unit.flatten(1)[:, index], unit).masked_fill(~free, 0.0)
        sim.view(-1)[index] = 1.0  # its own similarity, also where its code is zero
        sim = sim.masked_fill(sim < threshold * sim.max(), 0.0) / sim.max()
        masks.append(sim)
        free &= sim <= 0
    masks = (median_filter3(torch.stack(masks)) * SHARPNESS).clamp(0.0, 1.0)
    nonzero = masks[masks != 0]
    level = nonzero.mean() if nonzero.numel() else masks.new_tensor(0.0)
    background = (level - masks.sum(0)).clamp(0.0, 1.0)
    return torch.cat([background[None], masks])


def vote(masks: Tensor, clusters: Tensor, n_clusters: int) -> Tensor:
    """H x W pseudo-labels: each mask (ids 1.. of H x W ``masks``) takes the most frequent cluster of ``clusters``
    (H x W) inside it, the smallest id on a tie; the background (id 0) is IGNORE."""
    n_masks = int(masks.max()) + 1
    counts = torch.bincount((masks * n_clusters + clusters).flatten(), minlength=n_masks * n_clusters)
    label = counts.view(n_masks, n_clusters).argmax(1)
    label[0] = IGNORE
    return label[masks]
