"""Label-free criteria for choosing a checkpoint, computed at every validation from the validation images alone (the
labels are never read for them), so that a run on unlabelled data can choose a checkpoint and a labelled run can set
its label-free choice (label_free.pth) beside the label-chosen best.pth:

- ``cluster_similarity``: the cluster probe's own objective, the mean over the validation patches of the cosine
  similarity of a patch's code to the centroid it is assigned to (higher is better);
- ``rankme``: the effective rank of the code (RankMe, Garrido et al., ICML 2023): exp of the entropy of the
  normalised singular values of the matrix of all validation patch codes (higher is better);
- ``ppap_loss``: the PPAP loss of each validation image alone, the network in evaluation mode (no feature dropout),
  the anchors drawn from a fixed stream, mean over the images (lower is better);
- ``stability``: the adjusted Rand index of the validation patches' cluster assignments at this validation and at the
  previous one (higher is better; NaN at a run's first validation and at the first after a resume).

Each is computed on the patch grid (the code's resolution) from sums over every process's images, so that it does not
depend on the number of processes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from model.ppap import NetOutput
from utils.distributed import ONE_PROCESS, World

# each criterion of LABEL_FREE_CRITERIA (train.label_free_criterion's choices): whether a higher value is better
HIGHER_IS_BETTER = {"cluster_similarity": True, "rankme": True, "ppap_loss": False, "stability": True}
RANKME_EPS = 1e-7  # added to the normalised singular values before their entropy, as the RankMe paper does
ANCHOR_SEED = 0  # the stream the validation PPAP loss draws each image's anchors from


def rankme(gram: Tensor, n_rows: int) -> float:
    """RankMe of an ``n_rows`` x D matrix ``Z`` given ``Z^T Z``: its min(n_rows, D) singular values are the square
    roots of the largest eigenvalues of that matrix. Eigenvalues below float64's resolution of the largest one are
    rounding noise of zero singular values: they count as zero, as an SVD of ``Z`` finds them."""
    eigenvalues = torch.linalg.eigvalsh(gram.double()).flip(0)[:n_rows]  # descending
    noise = eigenvalues.abs().max() * gram.shape[0] * torch.finfo(torch.float64).eps
    singular = torch.where(eigenvalues > noise, eigenvalues, 0.0).sqrt()
    if float(singular.sum()) == 0:
        return math.nan
    p = singular / singular.sum() + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def adjusted_rand_index(table: Tensor) -> float:
    """The adjusted Rand index (Hubert and Arabie, 1985) of two partitions given their contingency table (counts of
    the items in cluster i of the first and cluster j of the second); 1.0 where both put every item in one cluster."""
    table = table.double()

    def pairs(counts: Tensor) -> Tensor:
        return (counts * (counts - 1) / 2).sum()

    n = table.sum()
    together, first, second = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = first * second / (n * (n - 1) / 2) if n > 1 else torch.zeros((), dtype=torch.float64)
    most = (first + second) / 2
    if float(most - expected) == 0:
        return 1.0
    return float((together - expected) / (most - expected))


def better(value: float, than: float, criterion: str) -> bool:
    """Whether ``value`` of ``criterion`` is at least as good as ``than`` (a tie keeps the later weights, as best.pth
    does); NaN is never better, and anything is better than NaN."""
    if math.isnan(value):
        return False
    if math.isnan(than):
        return True
    return value >= than if HIGHER_IS_BETTER[criterion] else value <= than


class LabelFree:
    """Collects the criteria over the batches of one validation (``process``), then gives them (``result``).

    ``previous``: this process's cluster assignments at the previous validation (``assignments`` after it), for the
    stability; None at the first validation."""

    def __init__(self, cluster_probe: nn.Module, loss_fn: nn.Module, is_direct: bool, previous: Optional[Tensor],
                 dim: int, device: torch.device) -> None:
        self.cluster_probe, self.loss_fn, self.is_direct, self.previous = cluster_probe, loss_fn, is_direct, previous
        n_clusters = dim if is_direct else cluster_probe.clusters.shape[0]
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # similarity, patches, PPAP loss, images
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # of the patch codes
        self.table = torch.zeros(n_clusters, n_clusters, dtype=torch.float64, device=device)  # previous x current
        self.parts: list[Tensor] = []  # this validation's assignments, batch by batch (on the CPU)
        self.seen = 0  # patches assigned so far

    def process(self, out: NetOutput, code: Tensor) -> None:
        """One batch: the network's output and the code the probes see (B x D x h x w, on the patch grid)."""
        code = code.float()
        inner = self.cluster_probe(code, is_direct=self.is_direct).inner
        similarity, assigned = inner.max(dim=1)
        rows = code.permute(0, 2, 3, 1).reshape(-1, code.shape[1]).double()
        self.gram += rows.T @ rows
        per_image = code.shape[2] * code.shape[3]
        loss = sum(float(self.loss_fn(out.z[j * per_image:(j + 1) * per_image], out.feats[j:j + 1],
                                      world=ONE_PROCESS, generator=torch.Generator().manual_seed(ANCHOR_SEED)).loss)
                   for j in range(code.shape[0]))
        self.sums += torch.tensor([float(similarity.double().sum()), similarity.numel(), loss, code.shape[0]],
                                  dtype=torch.float64, device=self.sums.device)
        self._count(assigned.reshape(-1))

    def _count(self, assigned: Tensor) -> None:
        self.parts.append(assigned.to("cpu", torch.int16))
        start, self.seen = self.seen, self.seen + assigned.numel()
        if self.previous is not None and self.seen <= self.previous.numel():
            n = self.table.shape[0]
            before = self.previous[start:self.seen].to(assigned.device, torch.long)
            self.table += torch.bincount(before * n + assigned, minlength=n * n).reshape(n, n).double()

    @property
    def assignments(self) -> Tensor:
        """This validation's cluster assignments, in the order of the images (the next validation's ``previous``)."""
        return torch.cat(self.parts) if self.parts else torch.zeros(0, dtype=torch.int16)

    def result(self, world: World = ONE_PROCESS) -> dict[str, float]:
        """Every criterion over all processes' images (NaN where there were none)."""
        similarity, patches, loss, images = world.sum(self.sums).tolist()
        gram, table = world.sum(self.gram), world.sum(self.table)
        # every process compares with its previous assignments, or none does (a resumed run has none)
        missing = self.previous is None or self.seen != self.previous.numel()
        comparable = float(world.sum(torch.tensor([float(missing)], device=self.sums.device))) == 0
        return {"cluster_similarity": similarity / patches if patches else math.nan,
                "rankme": rankme(gram, int(patches)) if patches else math.nan,
                "ppap_loss": loss / images if images else math.nan,
                "stability": adjusted_rand_index(table) if comparable and patches else math.nan}
