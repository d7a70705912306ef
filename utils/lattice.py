"""A permutohedral lattice (Adams, Baek and Davis 2010) and the fully connected CRF of Krähenbühl and Koltun (2011)
on it, in plain PyTorch: on the CPU or the GPU, batched over images, without a compiled extension.

It is built the way pydensecrf builds it (its permutohedral.cpp, pairwise.cpp and densecrf.cpp, SSE path), with the
same lattice, weights and constants in float32, so that both give the same refinement up to float rounding (the
filter's sums run in another order than pydensecrf's loops: probabilities within 2e-5 of its, measured):

- lattice: features scaled by 1/sqrt((i+1)(i+2)) * sqrt(2/3)(d+1), elevated onto the hyperplane, the nearest
  remainder-0 point found by rounding to nearest (ties to even), the simplex by ranking the differences, the
  barycentric weights, the d+1 enclosing vertices as integer keys; pydensecrf hashes the keys, we pack each into
  one int64 and sort them, which gives the same vertices in another order;
- filtering: splat (each pixel's values times its barycentric weights, added into its vertices), blur (along each
  of the d+1 lattice axes in turn, new = old + (left + right) / 2, missing neighbours count as 0), slice (the
  weighted sum of the vertices, times the constant 1 / (1 + 2^-d)); each step is one sparse (CSR) matrix built with
  the lattice, so that filtering is d+3 sparse-dense products, without the (pixels x (d+1) x channels) temporaries
  of gathering and scattering, each written into a buffer that the mean field reuses (``Buffers``);
- kernel: symmetric normalisation, K(Q) = n * lattice(n * Q) with n = 1 / sqrt(lattice(1) + 1e-20);
- mean field: Q = softmax(-unary); 10 times Q = softmax(-unary + sum_k w_k K_k(Q)) (Potts compatibility).

Images of a batch share one bilateral lattice whose keys carry the image's index, so that no vertex and no blur step
crosses from one image to another. The Gaussian kernel's lattice depends only on the pixels' positions: one image's
is built once per image size and device (and kept) and filters all images of a batch at once, as the columns of one
matrix. Several score maps of the same images (the evaluation's two probes) run through one mean field side by side,
each normalised on its own: a filter then is one product with all their columns, and every column's result is the
same as alone.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

KEY_LIMIT = 2**62  # the keys of a lattice are packed into one int64 each
INT32_LIMIT = 2**31  # sparse matrices whose sizes stay below it get int32 indices: half the index reads
BLUR_WEIGHTS = torch.tensor([0.5, 1.0, 0.5])  # of a vertex's two neighbours along an axis and of itself
POSITION_LATTICES = 4  # Gaussian-kernel lattices kept, one per image size and device


class Permutohedral:
    """The lattice of ``features`` (N x d, float32; already divided by the kernel's standard deviations); pixels of
    different ``groups`` (N int64 image indices, or None for one image) never share a vertex."""

    def __init__(self, features: Tensor, groups: Optional[Tensor] = None) -> None:
        n, d = features.shape
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
        # the simplex: the rank of each coordinate's distance to it, compared pair by pair as pydensecrf compares
        # them (for x < y, rank[x] + 1 if diff[x] < diff[y], else rank[y] + 1)
        diff = (elevated - rem0).T.contiguous()  # (d+1) x N
        rank = torch.zeros(d + 1, n, dtype=torch.long, device=device)
        for x in range(d):
            below = diff[x + 1:] > diff[x]  # y after x: diff[x] < diff[y]
            rank[x] += below.sum(0)
            rank[x + 1:] += ~below
        rank = rank.T
        rank = rank + offsum[:, None].long()
        shift = (rank < 0).long() * (d + 1) - (rank >= d + 1).long() * (d + 1)
        rank, rem0 = rank + shift, rem0 + shift
        # barycentric weights: slot d - rank[i] gets +value[i], the next one -value[i] (each slot one of each, so
        # the order pydensecrf adds them in does not matter)
        value = (elevated - rem0) * down
        bary = torch.zeros(n, d + 2, device=device)
        bary.scatter_add_(1, d - rank, value)
        bary.scatter_add_(1, d - rank + 1, -value)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        weights = bary[:, : d + 1].contiguous()  # N x (d+1)
        # the d+1 vertices of a pixel, packed into one int64 each: the digits (image index, then the first d
        # coordinates of key[r] = rem0 + r - (d+1) [rank > d - r]) in mixed radix, each digit offset by its lowest
        # value; a key's coordinates lie within d+1 of rem0's and its blur neighbours' within 2(d+1)
        group = groups if groups is not None else torch.zeros(n, dtype=torch.long, device=device)
        digits = torch.cat([group[:, None], rem0.long()[:, :d]], dim=1)  # N x (1+d)
        margin = torch.full((d + 1,), 2 * (d + 1), device=device)
        margin[0] = 0
        low, high = digits.amin(0) - margin, digits.amax(0) + margin
        span = (high - low + 1).tolist()
        if math.prod(span) * 2 * (d + 1) >= KEY_LIMIT:  # the codes, and the sums that make them, fit
            raise ValueError("the lattice's keys do not fit in 64 bits: features too large for their standard "
                             "deviations")
        strides = [math.prod(span[i + 1:]) for i in range(d + 1)]
        stride = torch.tensor(strides, device=device)
        # code of key[r] = code of (group, rem0) + r * sum(strides of the coordinates) - (d+1) * the strides of the
        # coordinates whose rank exceeds d - r: of the r highest ranks
        by_rank = torch.zeros(n, d + 1, dtype=torch.long, device=device)
        by_rank.scatter_(1, rank, torch.cat([stride[1:], stride.new_zeros(1)]).expand(n, d + 1))
        highest = torch.cat([by_rank.new_zeros(n, 1), by_rank.flip(1).cumsum(1)[:, :d]], dim=1)  # N x (d+1)
        codes = (((digits - low) * stride).sum(1)[:, None] + torch.arange(d + 1, device=device) * sum(strides[1:])
                 - (d + 1) * highest).reshape(-1)
        # the vertices: the distinct codes in ascending order (in pydensecrf's hash table, in order of appearance)
        codes, order = torch.sort(codes, stable=True)  # pixels ascending within one vertex
        first = torch.ones_like(codes, dtype=torch.bool)
        first[1:] = codes[1:] != codes[:-1]
        vertex = first.cumsum(0) - 1  # of each sorted entry
        vertex_codes = codes[first]  # ascending
        self.m = len(vertex_codes)
        offsets = torch.empty_like(vertex)
        offsets[order] = vertex
        offsets = offsets.reshape(n, d + 1)  # N x (d+1): the vertex of each of a pixel's remainders
        # splat, blur and slice as sparse matrices (CSR): one sparse-dense product per step, on any device
        alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-d)))
        self._splat = _csr(vertex, torch.div(order, d + 1, rounding_mode="floor"), weights.reshape(-1)[order],
                           (self.m, n))
        columns, order = torch.sort(offsets, dim=1)  # a pixel's d+1 vertices, in column order
        self._slice = _csr(torch.arange(n, device=device).repeat_interleave(d + 1), columns.reshape(-1),
                           (torch.gather(weights, 1, order) * alpha).reshape(-1), (n, self.m))
        vertices = torch.arange(self.m, device=device)
        self._blurs = []  # along each lattice axis: new = old + (left + right) / 2, a missing neighbour counting 0
        for j in range(d + 1):
            # the left neighbour: every coordinate - 1, but coordinate j + d; the right one the opposite. Vertex
            # indices ascend with the codes: the neighbour of the lower code comes first in a row
            step = sum(strides[1:]) - ((d + 1) * strides[1 + j] if j < d else 0)
            lower, higher = _find(vertex_codes, vertex_codes - abs(step)), _find(vertex_codes, vertex_codes + abs(step))
            columns = torch.stack([lower, vertices, higher], dim=1)  # M x 3, M where missing
            present = columns < self.m
            self._blurs.append(_csr(vertices[:, None].expand(-1, 3)[present], columns[present],
                                    BLUR_WEIGHTS.to(device).expand(self.m, 3)[present], (self.m, self.m)))

    def filter(self, values: Tensor, reverse: bool = False, buffers: Optional[Buffers] = None) -> Tensor:
        """Splat, blur and slice N x C float32 values (pydensecrf's ``Permutohedral::compute``). The result is held
        by ``buffers`` (the next filter of the same shape overwrites it) when they are given."""
        buffers = buffers if buffers is not None else Buffers(values.device)
        n, c = values.shape
        lattice, spare = buffers("vertices", self.m, c), buffers("vertices, spare", self.m, c)
        _product(self._splat, values, lattice)
        for blur in (reversed(self._blurs) if reverse else self._blurs):
            lattice, spare = _product(blur, lattice, spare), lattice
        return _product(self._slice, lattice, buffers("pixels", n, c))


class Buffers:
    """Tensors reused by the filters of one mean field, one per role and shape: on the CPU a fresh large tensor
    costs a page fault per 4 KiB when first written, and allocating every product's result took most of a filter's
    time there (8x, measured)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: dict[tuple, Tensor] = {}

    def __call__(self, role: str, *shape: int) -> Tensor:
        key = (role, shape)
        if key not in self._held:
            # zeroed: a buffer then holds finite values (for finite scores), so that a product with beta 0 gives
            # the product even where a backend multiplies the old values by 0 instead of ignoring them
            self._held[key] = torch.zeros(shape, device=self.device)
        return self._held[key]


def _find(vertices: Tensor, codes: Tensor) -> Tensor:
    """The index of each code among the M ascending codes of ``vertices``, or M where it is not one of them."""
    m = len(vertices)
    index = torch.searchsorted(vertices, codes).clamp_max(m - 1)
    return torch.where(vertices[index] == codes, index, torch.full_like(index, m))


def _product(sparse: Tensor, dense: Tensor, out: Tensor) -> Tensor:
    """sparse @ dense, written into out: addmm with beta 0 ignores out's old values and writes the product there,
    where mm(out=...) would first allocate and zero a temporary of out's size."""
    return torch.addmm(out, sparse, dense, beta=0, out=out)


def _csr(rows: Tensor, columns: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """The sparse CSR matrix of the entries (rows sorted, the columns of a row sorted, no entry twice); int32
    indices where they fit, the index type cuSPARSE supports best."""
    counts = torch.bincount(rows, minlength=size[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    if max(*size, len(values)) < INT32_LIMIT:
        crow, columns = crow.int(), columns.int()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are not
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, columns, values.float().contiguous(), size, check_invariants=False)


def kernel_normalizer(lattice: Permutohedral, n: int, device: torch.device) -> Tensor:
    """pydensecrf's NORMALIZE_SYMMETRIC: 1 / sqrt(lattice(1) + 1e-20), the sum taken in double as there."""
    ones = torch.ones(n, 1, device=device)
    return (1.0 / torch.sqrt(lattice.filter(ones).double() + 1e-20)).float()


class Kernel(NamedTuple):
    """A Gaussian kernel of the CRF, symmetrically normalised: K(Q) = norm * lattice(norm * Q), times ``weight``
    (the Potts compatibility). Its lattice spans the pixels of all images of a batch, or, with ``per_image``, those
    of one image, and then serves each image of the batch alike (a kernel on positions only)."""
    lattice: Permutohedral
    norm: Tensor  # (pixels of the lattice) x 1
    weight: float
    per_image: bool = False

    def message(self, q: Tensor, buffers: Buffers) -> Tensor:
        """K(Q) of B x P x C values (P pixels of each of B images), held by ``buffers``."""
        b, p, c = q.shape
        if self.per_image:  # the images side by side as the columns of one P x (B C) matrix
            norm = self.norm.view(p, 1, 1)
            values = torch.mul(q.transpose(0, 1), norm, out=buffers("values", p, b, c))
            return self.lattice.filter(values.view(p, b * c), buffers=buffers).view(p, b, c).mul_(norm).transpose(0, 1)
        norm = self.norm.view(b, p, 1)
        values = torch.mul(q, norm, out=buffers("values", b, p, c))
        return self.lattice.filter(values.view(b * p, c), buffers=buffers).view(b, p, c).mul_(norm)


def mean_field(unary: Tensor, kernels: Sequence[Kernel], iterations: int,
               classes: Optional[Sequence[int]] = None) -> Tensor:
    """B x P x C probabilities after ``iterations`` mean-field steps from the B x P x C ``unary`` energies, with Potts
    pairwise terms, ``kernels`` in the order they were added. ``classes``: the unary holds several maps side by side
    in its last dimension, with these numbers of classes, each normalised on its own (default: one map)."""
    sizes = list(classes) if classes is not None else [unary.shape[-1]]

    def normalised(energy: Tensor) -> Tensor:
        if len(set(sizes)) == 1:  # maps of as many classes (the two probes'): one softmax over the last of k x C
            return torch.softmax(energy.view(*energy.shape[:-1], len(sizes), sizes[0]), dim=-1).view(energy.shape)
        return torch.cat([torch.softmax(e.contiguous(), dim=-1) for e in energy.split(sizes, dim=-1)], dim=-1)

    buffers = Buffers(unary.device)
    q, energy = normalised(-unary), torch.empty_like(unary)
    for _ in range(iterations):
        torch.neg(unary, out=energy)
        for kernel in kernels:  # energy - (-weight) * message: pydensecrf adds the negated Potts messages
            energy.sub_(kernel.message(q, buffers).mul_(-kernel.weight))
        q = normalised(energy)
    return q


def dense_crf_torch(images: Tensor, scores: Tensor) -> Tensor:
    """The dense CRF of ``utils.crf.dense_crf`` on a batch: B x H x W x 3 uint8 RGB images and B x C x h x w scores
    (logits or log-probabilities, any float type) on one device -> B x C x H x W float32 probabilities there.

    The same steps as the pydensecrf backend: scores resized to the image (bilinear) and turned into probabilities,
    unary = -log(max(p, 1e-5)), a Gaussian kernel on (x, y) / 1 with weight 3 and a bilateral kernel on
    (x, y) / 67 and the colours / 3 in BGR order (as STEGO passes the image) with weight 4, 10 mean-field
    iterations."""
    return dense_crf_torch_shared(images, [scores])[0]


def dense_crf_torch_shared(images: Tensor, scores: Sequence[Tensor]) -> list[Tensor]:
    """``dense_crf_torch`` of several score maps of the same images (the linear and the cluster probe's), refined
    together: the lattices built once, one filter for the columns of all maps; each map's result is the same as
    alone."""
    from utils.crf import CRF_MAX_ITER, UNARY_CLIP

    if images.dim() != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be a B x H x W x 3 uint8 tensor, got {tuple(images.shape)} {images.dtype}")
    for s in scores:
        if s.dim() != 4 or len(s) != len(images) or not s.is_floating_point():
            raise ValueError(f"scores must be a B x C x h x w float tensor for {len(images)} images, got "
                             f"{tuple(s.shape)} {s.dtype}")
    b, height, width, _ = images.shape
    unaries = []
    for s in scores:
        s = s.float()
        if s.shape[-2:] != (height, width):
            s = torch.nn.functional.interpolate(s, (height, width), mode="bilinear", align_corners=False)
        probs = torch.softmax(s, dim=1).clamp(UNARY_CLIP, 1.0)
        unaries.append((-torch.log(probs)).permute(0, 2, 3, 1).reshape(b, height * width, -1))  # pixels row by row
    classes = [u.shape[-1] for u in unaries]
    q = mean_field(torch.cat(unaries, dim=-1) if len(unaries) > 1 else unaries[0], _crf_kernels(images),
                   CRF_MAX_ITER, classes)
    return [part.reshape(b, height, width, -1).permute(0, 3, 1, 2).contiguous() for part in q.split(classes, dim=-1)]


def _crf_kernels(images: Tensor) -> list[Kernel]:
    """The Gaussian kernel, then the bilateral one, in the order dense_crf adds them, for a batch of B x H x W x 3
    uint8 RGB images."""
    from utils.crf import CRF_BI_RGB_STD, CRF_BI_W, CRF_BI_XY_STD

    b, height, width, _ = images.shape
    device = images.device
    x, y = _positions(height, width, device)
    x, y = x.repeat(b), y.repeat(b)
    bgr = images.flip(-1).reshape(-1, 3).float()
    groups = torch.arange(b, device=device).repeat_interleave(height * width)
    features = torch.stack([x / float(CRF_BI_XY_STD), y / float(CRF_BI_XY_STD),
                            *(bgr[:, k] / float(CRF_BI_RGB_STD) for k in range(3))], 1)
    bilateral = Permutohedral(features, groups)
    return [_position_kernel(height, width, device),
            Kernel(bilateral, kernel_normalizer(bilateral, len(features), device), float(CRF_BI_W))]


def _positions(height: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The x and y of an image's pixels, row by row, as float32."""
    rows, cols = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                                torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return cols.reshape(-1), rows.reshape(-1)


@functools.lru_cache(maxsize=POSITION_LATTICES)
def _position_kernel(height: int, width: int, device: torch.device) -> Kernel:
    """The Gaussian kernel on (x, y) / sxy of one height x width image, for every image of that size: its lattice
    does not depend on the image's content."""
    from utils.crf import CRF_POS_W, CRF_POS_XY_STD

    x, y = _positions(height, width, device)
    lattice = Permutohedral(torch.stack([x / float(CRF_POS_XY_STD), y / float(CRF_POS_XY_STD)], 1))
    return Kernel(lattice, kernel_normalizer(lattice, height * width, device), float(CRF_POS_W), per_image=True)
