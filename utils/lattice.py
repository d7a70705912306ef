"""A permutohedral lattice (Adams, Baek and Davis 2010) and the fully connected CRF of Krähenbühl and Koltun (2011)
on it, in plain PyTorch: on the CPU or the GPU, batched over images, without a compiled extension.

It is built the way pydensecrf builds it (its permutohedral.cpp, pairwise.cpp and densecrf.cpp, SSE path), step by
step and in the same float32 operations, so that both give the same refinement:

- lattice: features scaled by 1/sqrt((i+1)(i+2)) * sqrt(2/3)(d+1), elevated onto the hyperplane, the nearest
  remainder-0 point found by rounding to nearest (ties to even), the simplex by ranking the differences, the
  barycentric weights, the d+1 enclosing vertices as integer keys; pydensecrf hashes the keys, we sort them
  (``torch.unique``), which gives the same vertices in another order;
- filtering: splat (each pixel's values times its barycentric weights, added into its vertices in pixel order),
  blur (along each of the d+1 lattice axes in turn, new = old + (left + right) / 2, missing neighbours count as 0),
  slice (the weighted sum of the vertices, times the constant 1 / (1 + 2^-d));
- kernel: symmetric normalisation, K(Q) = n * lattice(n * Q) with n = 1 / sqrt(lattice(1) + 1e-20);
- mean field: Q = softmax(-unary); 10 times Q = softmax(-unary + sum_k w_k K_k(Q)) (Potts compatibility).

Images of a batch share one lattice whose keys carry the image's index, so that no vertex and no blur step crosses
from one image to another.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

KEY_LIMIT = 2**62  # the keys of a lattice are packed into one int64 each


class Permutohedral:
    """The lattice of ``features`` (N x d, float32; already divided by the kernel's standard deviations); pixels of
    different ``groups`` (N int64 image indices, or None for one image) never share a vertex."""

    def __init__(self, features: Tensor, groups: Optional[Tensor] = None) -> None:
        n, d = features.shape
        self.d = d
        device = features.device
        features = features.float()
        inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
        scale = [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
        # elevate: y = E f, summed from the last feature down as pydensecrf sums it
        elevated = [None] * (d + 1)
        total = torch.zeros(n, device=device)
        for j in range(d, 0, -1):
            cf = features[:, j - 1] * float(scale[j - 1])
            elevated[j] = total - float(j) * cf
            total = total + cf
        elevated[0] = total
        elevated = torch.stack(elevated, dim=1)  # N x (d+1)
        # the nearest remainder-0 point, by rounding each coordinate / (d+1) to the nearest integer (ties to even)
        down = float(np.float32(1.0 / (d + 1)))
        rounded = torch.round(elevated * down)
        rem0 = rounded * float(d + 1)
        offsum = torch.zeros(n, device=device)
        for i in range(d + 1):
            offsum = offsum + rounded[:, i]
        # the simplex: the rank of each coordinate's distance to it
        diff = elevated - rem0
        rank = torch.zeros(n, d + 1, device=device)
        for i in range(d):
            for j in range(i + 1, d + 1):
                below = (diff[:, i] < diff[:, j]).float()
                rank[:, i] += below
                rank[:, j] += 1.0 - below
        rank = rank + offsum[:, None]
        shift = (rank < 0).float() * (d + 1) - (rank >= d + 1).float() * (d + 1)
        rank, rem0 = rank + shift, rem0 + shift
        # barycentric weights, accumulated in the order pydensecrf accumulates them
        bary = torch.zeros(n, d + 2, device=device)
        value = (elevated - rem0) * down
        rows = torch.arange(n, device=device)
        rank_long = rank.long()
        for i in range(d + 1):
            bary[rows, d - rank_long[:, i]] += value[:, i]
            bary[rows, d - rank_long[:, i] + 1] -= value[:, i]
        bary[:, 0] += 1.0 + bary[:, d + 1]
        self.weights = bary[:, : d + 1].contiguous()  # N x (d+1)
        # the d+1 vertices: key[i] = rem0[i] + canonical[remainder][rank[i]], for the first d coordinates, after
        # the pixel's image index
        remainder = torch.arange(d + 1, device=device)
        over = rank_long[:, None, :d] > (d - remainder)[None, :, None]  # N x (d+1) x d
        keys = rem0.long()[:, None, :d] + remainder[None, :, None] - (d + 1) * over.long()
        group = (groups if groups is not None else torch.zeros(n, dtype=torch.long, device=device))
        keys = torch.cat([group[:, None, None].expand(n, d + 1, 1), keys], dim=2)  # N x (d+1) x (1+d)
        self._low = keys.amin(dim=(0, 1)) - (d + 1)  # the neighbours' keys fit in the packing too
        span = keys.amax(dim=(0, 1)) + (d + 1) - self._low + 1
        if math.prod(span.tolist()) >= KEY_LIMIT:
            raise ValueError("the lattice's keys do not fit in 64 bits: features too large for their standard "
                             "deviations")
        self._strides = torch.tensor([math.prod(span.tolist()[i + 1:]) for i in range(d + 1)], device=device)
        self.vertices, offsets = torch.unique(self._code(keys).reshape(-1), sorted=True, return_inverse=True)
        self.offsets = offsets.reshape(n, d + 1)  # N x (d+1): the vertex of each of a pixel's remainders
        self.m = len(self.vertices)
        # the blur's neighbours along each lattice axis; M (a row of zeros) where the lattice has no vertex
        vertex_keys = self._key(self.vertices)
        self.neighbours = []
        for j in range(d + 1):
            left, right = vertex_keys.clone(), vertex_keys.clone()
            left[:, 1:] -= 1
            right[:, 1:] += 1
            if j < d:
                left[:, 1 + j] = vertex_keys[:, 1 + j] + d
                right[:, 1 + j] = vertex_keys[:, 1 + j] - d
            self.neighbours.append((self._find(left), self._find(right)))
        self.alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d)))

    def _code(self, keys: Tensor) -> Tensor:
        """Each key (last dimension) packed into one int64, mixed radix."""
        return ((keys - self._low) * self._strides).sum(dim=-1)

    def _key(self, codes: Tensor) -> Tensor:
        keys, rest = [], codes
        for stride in self._strides.tolist():
            keys.append(rest // stride)
            rest = rest % stride
        return torch.stack(keys, dim=1) + self._low

    def _find(self, keys: Tensor) -> Tensor:
        """The vertex index of each key, or M where the lattice has no such vertex."""
        codes = self._code(keys)
        index = torch.searchsorted(self.vertices, codes).clamp_max(self.m - 1)
        found = self.vertices[index] == codes
        return torch.where(found, index, torch.full_like(index, self.m))

    def filter(self, values: Tensor, reverse: bool = False) -> Tensor:
        """Splat, blur and slice N x C float32 values (pydensecrf's ``Permutohedral::compute``)."""
        n, c = values.shape
        d = self.d
        lattice = torch.zeros(self.m + 1, c, dtype=values.dtype, device=values.device)  # row M stays 0
        lattice.index_add_(0, self.offsets.reshape(-1),
                           (self.weights[:, :, None] * values[:, None, :]).reshape(-1, c))
        spare = torch.zeros_like(lattice)
        axes = range(d, -1, -1) if reverse else range(d + 1)
        for j in axes:  # new = old + (left + right) / 2, into the other buffer
            left, right = self.neighbours[j]
            both = torch.index_select(lattice, 0, left).add_(torch.index_select(lattice, 0, right))
            torch.add(lattice[: self.m], both, alpha=0.5, out=spare[: self.m])
            lattice, spare = spare, lattice
        out = torch.zeros(n, c, dtype=values.dtype, device=values.device)
        for j in range(d + 1):
            if c <= 2:  # pydensecrf's scalar path: (w * v) * alpha
                out = out + self.weights[:, j, None] * lattice[self.offsets[:, j]] * self.alpha
            else:  # its SSE path: (w * alpha) * v
                out = out + (self.weights[:, j, None] * self.alpha) * lattice[self.offsets[:, j]]
        return out


def kernel_normalizer(lattice: Permutohedral, n: int, device: torch.device) -> Tensor:
    """pydensecrf's NORMALIZE_SYMMETRIC: 1 / sqrt(lattice(1) + 1e-20), the sum taken in double as there."""
    ones = torch.ones(n, 1, device=device)
    return (1.0 / torch.sqrt(lattice.filter(ones).double() + 1e-20)).float()


def mean_field(unary: Tensor, kernels: list[tuple[Permutohedral, Tensor, float]], iterations: int) -> Tensor:
    """N x C probabilities after ``iterations`` mean-field steps from the N x C ``unary`` energies, with Potts
    pairwise terms: ``kernels`` holds (lattice, normaliser, weight) for each kernel, in the order they were added."""
    q = torch.softmax(-unary, dim=1)
    for _ in range(iterations):
        energy = -unary
        for lattice, norm, weight in kernels:
            message = lattice.filter(q * norm) * norm
            energy = energy - (-weight) * message
        q = torch.softmax(energy, dim=1)
    return q


def dense_crf_torch(images: Tensor, scores: Tensor) -> Tensor:
    """The dense CRF of ``utils.crf.dense_crf`` on a batch: B x H x W x 3 uint8 RGB images and B x C x h x w scores
    (logits or log-probabilities, any float type) on one device -> B x C x H x W float32 probabilities there.

    The same steps as the pydensecrf backend: scores resized to the image (bilinear) and turned into probabilities,
    unary = -log(max(p, 1e-5)), a Gaussian kernel on (x, y) / 1 with weight 3 and a bilateral kernel on
    (x, y) / 67 and the colours / 3 in BGR order (as STEGO passes the image) with weight 4, 10 mean-field
    iterations."""
    from utils.crf import (CRF_BI_RGB_STD, CRF_BI_W, CRF_BI_XY_STD, CRF_MAX_ITER, CRF_POS_W, CRF_POS_XY_STD,
                           UNARY_CLIP)

    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a B x H x W x 3 uint8 tensor, got {tuple(images.shape)} {images.dtype}")
    if scores.dim() != 4 or len(scores) != len(images) or not scores.is_floating_point():
        raise ValueError(f"scores must be a B x C x h x w float tensor for {len(images)} images, got "
                         f"{tuple(scores.shape)} {scores.dtype}")
    b, height, width, _ = images.shape
    c = scores.shape[1]
    device = images.device
    scores = scores.float()
    if scores.shape[-2:] != (height, width):
        scores = torch.nn.functional.interpolate(scores, (height, width), mode="bilinear", align_corners=False)
    probs = torch.softmax(scores, dim=1).clamp(UNARY_CLIP, 1.0)
    unary = (-torch.log(probs)).permute(0, 2, 3, 1).reshape(-1, c)  # pixels of image 0 row by row, then image 1...
    rows, cols = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    x, y = cols.reshape(-1).repeat(b), rows.reshape(-1).repeat(b)
    bgr = images.flip(-1).reshape(-1, 3).float()
    groups = torch.arange(b, device=device).repeat_interleave(height * width)
    features = [  # the Gaussian kernel first, then the bilateral one, in the order dense_crf adds them
        (CRF_POS_W, torch.stack([x / float(CRF_POS_XY_STD), y / float(CRF_POS_XY_STD)], 1)),
        (CRF_BI_W, torch.stack([x / float(CRF_BI_XY_STD), y / float(CRF_BI_XY_STD),
                                *(bgr[:, k] / float(CRF_BI_RGB_STD) for k in range(3))], 1)),
    ]
    kernels = []
    for weight, feature in features:
        lattice = Permutohedral(feature, groups)
        kernels.append((lattice, kernel_normalizer(lattice, len(feature), device), float(weight)))
    q = mean_field(unary, kernels, CRF_MAX_ITER)
    return q.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()
