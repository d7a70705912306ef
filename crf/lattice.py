"""A permutohedral lattice (Adams, Baek and Davis 2010) and the fully connected CRF of Krähenbühl and Koltun (2011)
on it, in plain PyTorch: on the CPU or the GPU, batched over images, without a compiled extension.

It is built the way pydensecrf builds it (its permutohedral.cpp, pairwise.cpp and densecrf.cpp, SSE path), with the
same lattice, weights and constants in float32, so that both give the same refinement up to float rounding (the
filter's sums run in another order than pydensecrf's loops; tests/test_lattice.py holds the probabilities on real
photos within 1e-3 of its):

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

from crf.parameters import (CRF_BI_RGB_STD, CRF_BI_W, CRF_BI_XY_STD, CRF_MAX_ITER, CRF_POS_W, CRF_POS_XY_STD,
                            UNARY_CLIP)

KEY_LIMIT = 2**62  # the keys of a lattice are packed into one int64 each
INT32_LIMIT = 2**31  # sparse matrices whose sizes stay below it get int32 indices: half the index reads
BLUR_WEIGHTS = torch.tensor([0.5, 1.0, 0.5])  # of a vertex's two neighbours along an axis and of itself
POSITION_LATTICES = 4  # Gaussian-kernel lattices kept, one per image size and device


class Permutohedral:
    """The lattice of ``features`` (N x d, float32; already divided by the kernel's standard deviations); pixels of
    different ``groups`` (N int64 image indices, or None for one image) never share a vertex.

    Built in the steps of Adams, Baek and Davis (2010): elevate the features onto the lattice's
    hyperplane, find each point's enclosing simplex (the nearest remainder-0 point and the ranks of the differences
    to it), its barycentric weights and the simplex's d+1 vertices (the keys); then the filter's splat, blur and
    slice as sparse matrices."""

    def __init__(self, features: Tensor, groups: Optional[Tensor] = None) -> None:
        elevated = _elevate(features.float())
        simplex = _enclosing_simplex(elevated)
        weights = _barycentric_weights(elevated, simplex)
        codes, keys = _simplex_keys(simplex, groups)
        vertices = _distinct_vertices(codes)
        self.m = len(vertices.codes)
        self._splat = _splat_matrix(vertices, weights)
        self._slice = _slice_matrix(vertices, weights)
        self._blurs = _blur_matrices(vertices.codes, keys)

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


def _down_factor(points: int) -> float:
    """1 / (d+1) in float32 for the d+1 coordinates of a lattice point (pydensecrf's down_factor)."""
    return float(np.float32(1.0 / points))


def _elevate(features: Tensor) -> Tensor:
    """N x d features -> N x (d+1) points on the hyperplane whose coordinates sum to 0: y = E f. Column i of E is
    (i ones, -i, zeros) / sqrt(i (i+1)): the columns are orthonormal, so that distances on the hyperplane are the
    features' distances, here times sqrt(2/3) (d+1), the inverse of the blur's standard deviation (Adams et al.,
    p. 6, as pydensecrf cites it)."""
    n, d = features.shape
    inv_std = np.float32(math.sqrt(2.0 / 3.0) * (d + 1))
    scale = [np.float32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    coordinates = [None] * (d + 1)
    total = torch.zeros(n, device=features.device)
    for j in range(d, 0, -1):  # from the last feature down, as pydensecrf sums them
        scaled = features[:, j - 1] * float(scale[j - 1])
        coordinates[j] = total - float(j) * scaled
        total = total + scaled
    coordinates[0] = total
    return torch.stack(coordinates, dim=1)


class _Simplex(NamedTuple):
    """The simplex of the lattice that encloses each elevated point."""
    origin: Tensor  # N x (d+1) float: its remainder-0 vertex, coordinates multiples of d+1 (pydensecrf: rem0)
    rank: Tensor  # N x (d+1) int64: the rank of each coordinate of point - origin, 0 for the largest


def _enclosing_simplex(elevated: Tensor) -> _Simplex:
    """The nearest remainder-0 point and the ranks of the differences to it. Where that point lies off the
    hyperplane (its coordinates / (d+1) sum to s, not 0), the ranks move by s, and a coordinate whose rank leaves
    0 ... d wraps around, moving the point by d+1 along it back onto the hyperplane."""
    points = elevated.shape[1]
    origin, off_plane = _nearest_remainder_zero(elevated)
    rank = _ranks(elevated - origin) + off_plane[:, None].long()
    shift = (rank < 0).long() * points - (rank >= points).long() * points
    return _Simplex(origin + shift, rank + shift)


def _nearest_remainder_zero(elevated: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest point whose coordinates are multiples of d+1, each coordinate / (d+1) rounded to the nearest
    integer (ties to even), and the sum of those integers (pydensecrf: sum): 0 where the point is on the hyperplane."""
    points = elevated.shape[1]
    rounded = torch.round(elevated * _down_factor(points))
    off_plane = torch.zeros(len(elevated), device=elevated.device)
    for i in range(points):  # column by column, as pydensecrf adds them
        off_plane = off_plane + rounded[:, i]
    return rounded * float(points), off_plane


def _ranks(differences: Tensor) -> Tensor:
    """N x (d+1): the rank of each coordinate among a point's, 0 for the largest, equal values ranked in coordinate
    order; compared pair by pair as pydensecrf compares them (for x < y, rank[x] + 1 if diff[x] < diff[y], else
    rank[y] + 1), so that ties (and NaNs) get pydensecrf's ranks."""
    points = differences.shape[1]
    by_coordinate = differences.T.contiguous()  # (d+1) x N
    rank = torch.zeros(points, len(differences), dtype=torch.long, device=differences.device)
    for x in range(points - 1):
        larger = by_coordinate[x + 1:] > by_coordinate[x]  # of the coordinates y after x
        rank[x] += larger.sum(0)
        rank[x + 1:] += ~larger
    return rank.T


def _barycentric_weights(elevated: Tensor, simplex: _Simplex) -> Tensor:
    """N x (d+1): the weight of each point's simplex vertex r (remainder r). With v = (point - origin) / (d+1),
    slot d - rank[i] gets +v[i] and the next slot -v[i]; slot d+1 wraps around to slot 0 (Adams et al., p. 10).
    A slot gets at most one term of each sign, so the order pydensecrf adds them in does not matter."""
    n, points = elevated.shape
    value = (elevated - simplex.origin) * _down_factor(points)
    weights = torch.zeros(n, points + 1, device=elevated.device)
    weights.scatter_add_(1, points - 1 - simplex.rank, value)
    weights.scatter_add_(1, points - simplex.rank, -value)
    weights[:, 0] += 1.0 + weights[:, points]
    return weights[:, :points].contiguous()


class _KeyCode(NamedTuple):
    """Lattice points, each with its image's index, packed into one int64 each (pydensecrf hashes them instead):
    the digits (the image's index, then the first d coordinates; the last one is minus their sum) in mixed radix,
    each digit offset by its lowest value, so that codes ascend with the points in lexicographic order."""
    low: Tensor  # 1+d: each digit's lowest value
    strides: list[int]  # 1+d: each digit's place value

    @staticmethod
    def covering(digits: Tensor) -> _KeyCode:
        """The code of the points within 2(d+1) of the N x (1+d) ``digits`` of the remainder-0 points: a simplex's
        vertices lie within d+1 of its remainder-0 point, their blur neighbours within 2(d+1)."""
        points = digits.shape[1]
        margin = torch.full((points,), 2 * points, device=digits.device)
        margin[0] = 0
        low, high = digits.amin(0) - margin, digits.amax(0) + margin
        span = (high - low + 1).tolist()
        if math.prod(span) * 2 * points >= KEY_LIMIT:  # the codes, and the sums that make them, fit
            raise ValueError("the lattice's keys do not fit in 64 bits: features too large for their standard "
                             "deviations")
        return _KeyCode(low, [math.prod(span[i + 1:]) for i in range(points)])

    @property
    def diagonal(self) -> int:
        """The code of a step of +1 in every coordinate."""
        return sum(self.strides[1:])

    def axis_step(self, axis: int) -> int:
        """The code of a step along lattice axis ``axis`` (0 ... d): +1 in every coordinate but that one, -d there
        (pydensecrf's n1; n2 is the step back)."""
        points = len(self.strides)
        return self.diagonal - (points * self.strides[1 + axis] if axis < points - 1 else 0)


def _simplex_keys(simplex: _Simplex, groups: Optional[Tensor]) -> tuple[Tensor, _KeyCode]:
    """The codes of each point's d+1 simplex vertices (N x (d+1), vertex r in column r) and the code that packs
    them. Vertex r (remainder r; pydensecrf's key) is origin + r in every coordinate, minus d+1 in the coordinates
    of the r highest ranks (rank > d - r)."""
    n, points = simplex.rank.shape
    device = simplex.rank.device
    group = groups if groups is not None else torch.zeros(n, dtype=torch.long, device=device)
    digits = torch.cat([group[:, None], simplex.origin.long()[:, :points - 1]], dim=1)  # N x (1+d)
    keys = _KeyCode.covering(digits)
    stride = torch.tensor(keys.strides, device=device)
    # each coordinate's stride at its rank, then summed over the r highest ranks (the last coordinate has no digit)
    stride_at_rank = torch.zeros(n, points, dtype=torch.long, device=device)
    stride_at_rank.scatter_(1, simplex.rank, torch.cat([stride[1:], stride.new_zeros(1)]).expand(n, points))
    lowered = torch.cat([stride_at_rank.new_zeros(n, 1), stride_at_rank.flip(1).cumsum(1)[:, :points - 1]], dim=1)
    origin_code = ((digits - keys.low) * stride).sum(1)
    return origin_code[:, None] + torch.arange(points, device=device) * keys.diagonal - points * lowered, keys


class _Vertices(NamedTuple):
    """The distinct vertices of the points' simplices, ascending by code (pydensecrf's hash table holds the same
    vertices in order of appearance), and the N (d+1) (point, remainder) entries sorted by vertex."""
    codes: Tensor  # M, ascending
    order: Tensor  # the entries (point * (d+1) + remainder) sorted by vertex, points ascending within one
    of_sorted: Tensor  # the vertex of each sorted entry


def _distinct_vertices(codes: Tensor) -> _Vertices:
    """The vertices of the N x (d+1) codes of the points' simplex vertices."""
    codes, order = torch.sort(codes.reshape(-1), stable=True)
    first = torch.ones_like(codes, dtype=torch.bool)
    first[1:] = codes[1:] != codes[:-1]
    return _Vertices(codes[first], order, first.cumsum(0) - 1)


def _splat_matrix(vertices: _Vertices, weights: Tensor) -> Tensor:
    """M x N splat: each point's value times its barycentric weights, added into its d+1 vertices."""
    n, points = weights.shape
    pixels = torch.div(vertices.order, points, rounding_mode="floor")
    return _csr(vertices.of_sorted, pixels, weights.reshape(-1)[vertices.order], (len(vertices.codes), n))


def _slice_matrix(vertices: _Vertices, weights: Tensor) -> Tensor:
    """N x M slice: the sum of a point's d+1 vertices times its barycentric weights, times 1 / (1 + 2^-d), the
    constant of pydensecrf's slice."""
    n, points = weights.shape
    alpha = float(np.float32(1.0) / (np.float32(1.0) + np.float32(2.0) ** np.float32(-(points - 1))))
    vertex = torch.empty_like(vertices.of_sorted)
    vertex[vertices.order] = vertices.of_sorted
    columns, order = torch.sort(vertex.reshape(n, points), dim=1)  # a point's vertices, in column order
    return _csr(torch.arange(n, device=weights.device).repeat_interleave(points), columns.reshape(-1),
                (torch.gather(weights, 1, order) * alpha).reshape(-1), (n, len(vertices.codes)))


def _blur_matrices(codes: Tensor, keys: _KeyCode) -> list[Tensor]:
    """M x M blur along each lattice axis in turn: new = old + (left + right) / 2, a missing neighbour counting 0."""
    m = len(codes)
    vertices = torch.arange(m, device=codes.device)
    blurs = []
    for axis in range(len(keys.strides)):
        step = abs(keys.axis_step(axis))
        # vertex indices ascend with the codes: the neighbour of the lower code comes first in a row
        columns = torch.stack([_find(codes, codes - step), vertices, _find(codes, codes + step)], dim=1)
        present = columns < m  # M where missing
        blurs.append(_csr(vertices[:, None].expand(-1, 3)[present], columns[present],
                          BLUR_WEIGHTS.to(codes.device).expand(m, 3)[present], (m, m)))
    return blurs


class Buffers:
    """Tensors reused by the filters of one mean field, one per role and shape: on the CPU a fresh large tensor
    costs a page fault per 4 KiB when first written, a cost that then comes once per mean field, not once per
    product."""

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
    """The dense CRF of ``crf.dense_crf`` on a batch: B x H x W x 3 uint8 RGB images and B x C x h x w scores
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
    x, y = _positions(height, width, device)
    lattice = Permutohedral(torch.stack([x / float(CRF_POS_XY_STD), y / float(CRF_POS_XY_STD)], 1))
    return Kernel(lattice, kernel_normalizer(lattice, height * width, device), float(CRF_POS_W), per_image=True)
