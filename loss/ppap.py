"""The PPAP loss: progressive proxy-anchor propagation with an ambiguity zone.

Semantics are those of the original implementation (``SupConLoss`` in the PPAP code):

1. Rows (patches in (image, row, col) order) are taken in blocks of ``split`` consecutive rows; there are
   ``N // split`` blocks (one block of all N rows when N < split). Rows after the last full block are never
   anchors but remain candidates.
2. Each block draws ``K = block_size // trainpatchsplit`` anchors uniformly without replacement.
3. ``s = f_anchor . f^T`` against all N rows of the (detached, L2-normalised) features. Positives ``P = s > Phi``
   with ``Phi = initialcrit_pos``; ``Psi = initialcrit_amb``.
4. ``prop_iter`` times: ``proxy = normalise(P @ f)`` (the mean of the positives, the anchor's own row included as
   in the original), ``s = proxy . f^T``, ``m = 1 - cos(previous proxy, proxy)`` (the anchor at the first step),
   ``Psi += m / sigma_amb``, ``Phi -= m / sigma_pos``, ``P = s > Phi``.
5. The anchor's own row is never a positive and never in the denominator. Confident negatives: ``s < Psi``.
   Rows with ``Psi <= s <= Phi`` form the ambiguous zone and are left out of the denominator.
6. ``logits = z_anchor . z^T / tau``; ``log_prob = logits - log(sum of exp(logits) over positives and confident
   negatives)`` (the original subtracts the row max first; logsumexp does the same stabilisation).
7. Per anchor the mean log_prob over its positives; anchors without a positive are skipped. Block loss =
   ``-(tau / base_tau) * mean over anchors``; loss = mean over blocks.

Differences from the original, all deliberate: similarities and thresholds are compared in fp32 (the original
compared fp16 similarities with fp16 thresholds); a block without any anchor that has a positive is left out of
the mean over blocks (the original returned NaN), and an anchor whose denominator would be empty cannot occur
because its positives are in it (the original could produce NaN gradients there). The negative count in the
statistics leaves the anchor's own row out, like the denominator.

Performance: the original materialised an (anchors x N x C) tensor to average the positives; here that mean is a
matrix product. Mining and the contrastive term are one custom autograd function that works on chunks of anchors
(``chunk_elements`` anchors x rows at a time) and keeps, between the passes, only what is linear in N or in the
anchors: each anchor's final proxy, its Phi and Psi and its logsumexp. The backward pass recomputes a chunk's
similarities to the proxies, with the forward's chunk shapes (so bit for bit the forward's values and decisions),
and its logits. No (anchors x N) tensor outlives its chunk: peak memory is bounded by ``chunk_elements`` whatever
the batch and the number of processes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from config import TrainingCoeff
from utils.distributed import ONE_PROCESS, World

DEFAULT_CHUNK_ELEMENTS = 1 << 24  # anchors x rows per chunk: 64 MiB per fp32 temporary


class PPAPResult(NamedTuple):
    loss: Tensor  # scalar; with several processes, this process's part (the parts sum to the global batch's loss)
    num_pos: Tensor  # mean number of positives per anchor
    num_neg: Tensor  # mean number of confident negatives per anchor


class Mining(NamedTuple):
    pos: Tensor  # (A, N) bool: positives after propagation, own row excluded
    neg: Tensor  # (A, N) bool: confident negatives (s < Psi), own row excluded
    phi: Tensor  # (A,) final positiveness boundary
    psi: Tensor  # (A,) final ambiguity boundary


def _similarities(proxy: Tensor, feats: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``proxy . feats^T``: the one product every decision of the mining is read from.

    The loss recomputes it in its backward pass on the same chunk (same shapes, same call), which gives the
    forward's values bit for bit, so that every positive and negative is decided the same way twice.
    """
    if out is None:
        out = proxy.new_empty(proxy.shape[0], feats.shape[0])
    return torch.matmul(proxy, feats.T, out=out)


def _propagate(anchor: Tensor, feats: Tensor, coeff: TrainingCoeff) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk of anchors (rows of ``feats``): ``(s, proxy, phi, psi)`` after ``prop_iter`` steps."""
    s = _similarities(anchor, feats)
    phi = torch.full((anchor.shape[0],), coeff.initialcrit_pos, dtype=feats.dtype, device=feats.device)
    psi = torch.full_like(phi, coeff.initialcrit_amb)
    pos = s > phi[:, None]
    proxy = anchor
    for _ in range(coeff.prop_iter):
        previous = proxy
        proxy = F.normalize(pos.to(feats.dtype) @ feats, dim=1)  # mean of the positives, renormalised
        _similarities(proxy, feats, out=s)  # the similarities to the new proxy, in the same buffer
        moved = 1.0 - F.cosine_similarity(previous, proxy, dim=1)
        psi = psi + moved / coeff.sigma_amb
        phi = phi - moved / coeff.sigma_pos
        torch.gt(s, phi[:, None], out=pos)
    return s, proxy, phi, psi


def _decide(s: Tensor, phi: Tensor, psi: Tensor, own_rows: Tensor) -> tuple[Tensor, Tensor]:
    """Positives ``s > phi`` and confident negatives ``s < psi`` of a chunk; the anchor's own row is neither."""
    pos = s > phi[:, None]
    neg = s < psi[:, None]
    own = (torch.arange(s.shape[0], device=s.device), own_rows)
    pos[own] = False
    neg[own] = False
    return pos, neg


@torch.no_grad()
def mine(feats: Tensor, anchor_rows: Tensor, coeff: TrainingCoeff, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Mining:
    """Positives and confident negatives of each anchor row of ``feats`` (N, C), unit rows, as full masks.

    For inspection and tests: the loss decides the same way, chunk by chunk, without keeping the masks.
    """
    n = feats.shape[0]
    a = anchor_rows.shape[0]
    pos = torch.empty(a, n, dtype=torch.bool, device=feats.device)
    neg = torch.empty_like(pos)
    phi = torch.empty(a, dtype=feats.dtype, device=feats.device)
    psi = torch.empty_like(phi)
    for sl in _chunks(a, n, chunk_elements):
        s, _, phi[sl], psi[sl] = _propagate(feats[anchor_rows[sl]], feats, coeff)
        pos[sl], neg[sl] = _decide(s, phi[sl], psi[sl], anchor_rows[sl])
    return Mining(pos=pos, neg=neg, phi=phi, psi=psi)


def _chunks(anchors: int, n: int, chunk_elements: int) -> list[slice]:
    step = max(1, chunk_elements // max(n, 1))
    return [slice(i, min(i + step, anchors)) for i in range(0, anchors, step)]


class _ProxyAnchorLogProb(torch.autograd.Function):
    """Mines each anchor and returns, per anchor, the mean over its positives of
    ``l - logsumexp(l over positives and confident negatives)``, ``l = z_a . z / tau`` (0 for an anchor without a
    positive), with its positive and negative counts.

    Only ``z`` receives a gradient. Between the passes it keeps what is linear in N or in the anchors: ``z``, the
    features, each anchor's final proxy, its two boundaries and its logsumexp. The backward pass recomputes, chunk
    by chunk with the forward's chunks, the similarities to the proxy (bit for bit the forward's, hence the same
    positives and negatives) and the logits, so that no (anchors x N) tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, z: Tensor, feats: Tensor, anchor_rows: Tensor, coeff: TrainingCoeff, chunk_elements: int):
        a, n = anchor_rows.shape[0], z.shape[0]
        out, lse = z.new_zeros(a), z.new_zeros(a)
        counts = torch.zeros(2, a, dtype=torch.long, device=z.device)  # positives, confident negatives
        phi, psi = feats.new_empty(a), feats.new_empty(a)
        proxy = feats.new_empty(a, feats.shape[1])
        for sl in _chunks(a, n, chunk_elements):
            rows = anchor_rows[sl]
            s, proxy[sl], phi[sl], psi[sl] = _propagate(feats[rows], feats, coeff)
            pos, neg = _decide(s, phi[sl], psi[sl], rows)
            del s
            n_pos = pos.sum(1)
            counts[0, sl], counts[1, sl] = n_pos, neg.sum(1)
            logits = z[rows] @ z.T
            logits.div_(coeff.tau)
            mean_pos = (logits * pos).sum(1) / n_pos.clamp(min=1)
            logits.masked_fill_(~(pos | neg), float("-inf"))  # only positives and negatives are counted
            chunk_lse = logits.logsumexp(dim=1)
            lse[sl] = chunk_lse.masked_fill(n_pos == 0, 0.0)  # an anchor without a positive counts for nothing
            out[sl] = torch.where(n_pos > 0, mean_pos - chunk_lse, 0.0)
        ctx.save_for_backward(z, feats, anchor_rows, proxy, phi, psi, lse, counts[0])
        ctx.tau, ctx.chunk_elements = coeff.tau, chunk_elements
        ctx.mark_non_differentiable(counts)
        return out, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, _grad_counts: None):
        z, feats, anchor_rows, proxy, phi, psi, lse, n_pos = ctx.saved_tensors
        grad_z = torch.zeros_like(z)
        weight = torch.where(n_pos > 0, grad_out / ctx.tau, 0.0)  # anchors without a positive add nothing
        for sl in _chunks(anchor_rows.shape[0], z.shape[0], ctx.chunk_elements):
            rows = anchor_rows[sl]
            # a fresh copy, as the forward's proxy was: a BLAS may take another path for memory aligned otherwise
            pos, neg = _decide(_similarities(proxy[sl].clone(), feats), phi[sl], psi[sl], rows)
            anchors = z[rows]
            g = anchors @ z.T
            g.div_(ctx.tau).masked_fill_(~(pos | neg), float("-inf"))
            g.sub_(lse[sl, None]).exp_().neg_()  # minus the softmax over the denominator
            # d out / d logits = positives / their count - softmax; d logits / d(z_a . z_j) = 1 / tau
            g.addcmul_(pos, 1.0 / n_pos[sl, None].clamp(min=1)).mul_(weight[sl, None])
            grad_z.addmm_(g.T, anchors)
            grad_z.index_add_(0, rows, g @ z)
        return grad_z, None, None, None, None


class PPAPLoss(nn.Module):
    """``PPAPLoss(cfg.training_coeff)(z, feats, anchors=None)`` -> ``PPAPResult(loss, num_pos, num_neg)``.

    ``z``: (N, D) unit rows (the projection of the code, with gradient). ``feats``: (N, C) rows or a (B, C, h, w)
    map, flattened in (image, row, col) order; detached and L2-normalised here. ``anchors``: LongTensor
    (blocks, K) of row indices local to each block, or None to draw them (from ``generator``, else torch's global
    CPU stream). Call it outside autocast: it computes in fp32 (or float64 for float64 inputs) whatever the input
    precision. ``feats_dtype`` (fp16 or bf16): the features are rounded to it first, halving what the processes
    exchange; mining then sees slightly different similarities (the rounding is the same with one process).

    Data-parallel (``world`` of several processes, each with its part of the global batch): the rows of all
    processes are gathered in rank order (``z`` with gradient), so positives and negatives are mined among all
    patches of the global batch, as with one process. ``anchors`` are those of the global batch and must be the
    same on every process (draw them from a generator seeded alike everywhere); each process computes the blocks
    of its ``world.share(blocks)``. ``loss`` is then this process's part: the parts of all processes sum to the
    loss of the global batch, and so do their gradients (the gather's backward adds every process's gradient
    for a row to the process that holds it). ``num_pos`` and ``num_neg`` are those of the global batch.
    """

    def __init__(self, cfg: TrainingCoeff, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                 feats_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.chunk_elements = chunk_elements
        self.feats_dtype = feats_dtype  # feats are rounded to it before they are gathered (None: kept as they are)

    def geometry(self, n: int) -> tuple[int, int, int]:
        """(blocks, rows per block, anchors per block) for N rows."""
        split = self.cfg.split
        blocks, size = (1, n) if n < split else (n // split, split)
        return blocks, size, max(1, size // self.cfg.trainpatchsplit)

    def draw_anchors(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """(blocks, K) anchors drawn uniformly without replacement within each block (CPU random stream)."""
        blocks, size, k = self.geometry(n)
        return torch.rand(blocks, size, generator=generator).argsort(dim=1)[:, :k]

    def forward(self, z: Tensor, feats: Tensor, anchors: Optional[Tensor] = None, world: World = ONE_PROCESS,
                generator: Optional[torch.Generator] = None) -> PPAPResult:
        if feats.dim() == 4:
            feats = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        if feats.shape[0] != z.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows but feats has {feats.shape[0]}")
        cfg = self.cfg
        dtype = torch.promote_types(z.dtype, torch.float32)  # fp32 under mixed precision; float64 stays float64
        with torch.autocast(z.device.type, enabled=False):
            # the global batch: every process's rows in rank order (z differentiable, feats not)
            z = world.gather(z.to(dtype), grad=True)
            feats = feats.detach().to(self.feats_dtype or dtype)  # rounded on every process, whatever their number
            f = F.normalize(world.gather(feats).to(dtype), dim=1)
            n = z.shape[0]
            blocks, size, k = self.geometry(n)
            if anchors is None:
                anchors = self.draw_anchors(n, generator)
            if anchors.shape[0] != blocks or anchors.dim() != 2 or anchors.min() < 0 or anchors.max() >= size:
                raise ValueError(f"anchors must be a ({blocks}, K) tensor of row indices in [0, {size}), got shape "
                                 f"{tuple(anchors.shape)}")
            mine_blocks = world.share(blocks)  # the blocks whose anchors this process computes
            offsets = torch.arange(mine_blocks.start, mine_blocks.stop, device=anchors.device)[:, None] * size
            anchor_rows = (anchors[mine_blocks.start:mine_blocks.stop] + offsets).reshape(-1).to(z.device)
            log_prob, mined = _ProxyAnchorLogProb.apply(z, f, anchor_rows, cfg, self.chunk_elements)
            valid = mined[0] > 0  # the anchors that have a positive
            per_anchor = -(cfg.tau / cfg.base_tau) * log_prob[valid]
            block_of = torch.arange(len(mine_blocks), device=z.device).repeat_interleave(anchors.shape[1])[valid]
            sums = z.new_zeros(len(mine_blocks)).index_add(0, block_of, per_anchor)
            counts = torch.bincount(block_of, minlength=len(mine_blocks))
            used = counts > 0
            # blocks with an anchor that has a positive, positives and confident negatives: over all processes
            totals = world.sum(torch.cat([used.sum()[None], mined.sum(1)]).double())
            n_used = int(totals[0])
            loss = (sums[used] / counts[used]).sum() / n_used if n_used else z.sum() * 0.0
            n_anchors = blocks * anchors.shape[1]
        return PPAPResult(loss=loss, num_pos=(totals[1] / n_anchors).float(), num_neg=(totals[2] / n_anchors).float())
