"""Unsupervised segmentation metrics: mIoU and pixel accuracy of the cluster probe (Hungarian-matched) and of the
linear probe (no matching), as STEGO's ``UnsupervisedMetrics`` (src/utils.py), which PPAP uses unchanged.

Each metric accumulates a confusion matrix of predicted cluster x true class over the evaluation set (one
``bincount`` per batch, on the device; labels outside [0, n_classes) are ignored). ``compute()`` matches clusters
to classes (``linear_sum_assignment`` maximising the matched pixels for the cluster metric, the identity for the
linear one) and returns ``{prefix + "mIoU", prefix + "Accuracy"}`` in percent:
accuracy = correctly assigned pixels / counted pixels; mIoU = mean over classes of TP / (TP + FP + FN), skipping
classes with TP + FP + FN = 0 (never labelled and never predicted).

Extra clusters (``extra_clusters`` > 0: the cluster probe has more clusters than there are classes). The matching
gives every class one cluster and leaves ``extra_clusters`` clusters unmatched (``cluster_to_class`` -1).
- Default: every labelled pixel is counted. A pixel in an unmatched cluster is wrong: it lowers the accuracy and
  is a false negative of its true class (a false positive of no class).
- ``legacy_extra_cluster_mask=True`` (config ``eval.legacy_extra_cluster_mask``), as the original: pixels predicted
  as a cluster id >= n_classes are dropped before counting, whatever the matching, and clusters 0..n_classes-1 are
  matched to the classes. Accuracy and IoU then ignore the pixels put in the extra clusters, so a model that sends
  its hard pixels there scores higher. (The original also ran the matching over the empty extra rows; that can only
  change a tie, where it might leave a real cluster unmatched and add an "Extra" IoU of 0 to the mean.)
Without extra clusters the two modes give the same numbers.

``per_class_iou`` gives NaN for a class that is never labelled and never predicted (it is kept, so that the keys
are always all the class names; the mIoU skips it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, Union

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from utils.files import atomic_output

CLUSTER_PREFIX = "Cluster_"  # metric names as the original printed them: Cluster_mIoU, Cluster_Accuracy
LINEAR_PREFIX = "Linear_"  # Linear_mIoU, Linear_Accuracy
PERCENT = 100.0

CM_DPI = 100
CM_CELL_INCHES = 0.42  # one confusion-matrix cell: room for its value ("0.83") at CM_VALUE_FONT_SIZE
CM_LABEL_INCHES = 1.9  # room for the class names left of and above the matrix
CM_PAD_INCHES = 0.6  # bottom margin
CM_BAR_INCHES = 1.0  # right margin, for the colour bar
CM_FONT_SIZE = 9
CM_VALUE_FONT_SIZE = 6.5
CM_VALUE_MIN = 0.005  # cells whose share rounds to 0.00 stay blank, so that the structure shows
CM_DARK = 0.55  # above this share the cell is dark: its value is written in white
CM_COLORMAP = "Blues"  # the original's seaborn heatmap colours, so that the two plots compare side by side


class UnsupervisedMetrics(Metric):
    """Confusion matrix of (n_classes + extra_clusters) predicted clusters x n_classes true classes.

    ``compute_hungarian``: True for the cluster probe (clusters matched to classes), False for the linear probe
    (prediction i is class i). ``prefix``: ``CLUSTER_PREFIX`` or ``LINEAR_PREFIX``.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, prefix: str, n_classes: int, extra_clusters: int, compute_hungarian: bool,
                 legacy_extra_cluster_mask: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_classes < 1 or extra_clusters < 0:
            raise ValueError(f"need n_classes >= 1 and extra_clusters >= 0 (got {n_classes}, {extra_clusters})")
        self.prefix = prefix
        self.n_classes = n_classes
        self.extra_clusters = extra_clusters
        self.n_clusters = n_classes + extra_clusters
        self.compute_hungarian = compute_hungarian
        self.legacy_extra_cluster_mask = legacy_extra_cluster_mask
        self._cluster_to_class: Tensor | None = None
        self._confusion: Tensor | None = None
        self.add_state("stats", default=torch.zeros(self.n_clusters, n_classes, dtype=torch.int64),
                       dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count integer predictions (cluster or class ids) against labels of the same shape."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same shape")
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("preds and target must be integer ids (take the argmax of the scores first)")
        with torch.no_grad():
            preds = preds.reshape(-1).long()
            target = target.reshape(-1).long()
            keep = (target >= 0) & (target < self.n_classes)
            if self.legacy_extra_cluster_mask:
                keep &= (preds >= 0) & (preds < self.n_classes)
            elif bool(((preds < 0) | (preds >= self.n_clusters)).any()):
                raise ValueError(f"predictions must be cluster ids in [0, {self.n_clusters})")
            cells = self.n_clusters * self.n_classes  # the last bin collects the ignored pixels
            index = torch.where(keep, preds * self.n_classes + target, cells)
            counts = torch.bincount(index, minlength=cells + 1)[:cells]
            self.stats += counts.view(self.n_clusters, self.n_classes).to(self.stats.device)

    def compute(self) -> dict[str, float]:
        """Match clusters to classes and return mIoU and accuracy in percent."""
        stats = self.stats.detach().cpu()  # summed over processes here: torchmetrics syncs around compute()
        self._confusion, self._cluster_to_class = stats.clone(), self._match(stats)
        tp, fp, fn = self._class_counts()
        counted = int(stats.sum())
        return {
            self.prefix + "mIoU": PERCENT * _nanmean(_iou(tp, fp, fn)),
            self.prefix + "Accuracy": PERCENT * float(tp.sum()) / counted if counted else math.nan,
        }

    def reset(self) -> None:
        super().reset()
        self._cluster_to_class = self._confusion = None

    @property
    def cluster_to_class(self) -> Tensor:
        """LongTensor of length n_classes + extra_clusters: the class of each cluster, -1 if unmatched."""
        self._require_computed()
        return self._cluster_to_class

    @property
    def confusion(self) -> Tensor:
        """The (n_classes + extra_clusters) x n_classes counts of the last compute(), summed over processes."""
        self._require_computed()
        return self._confusion

    def cluster_order(self) -> Tensor:
        """Cluster ids in class order (entry i is the cluster matched to class i), then the unmatched clusters."""
        mapping = self.cluster_to_class
        matched = torch.empty(self.n_classes, dtype=torch.int64)
        is_matched = mapping >= 0
        matched[mapping[is_matched]] = torch.nonzero(is_matched).squeeze(1)
        return torch.cat([matched, torch.nonzero(~is_matched).squeeze(1)])

    def map_clusters(self, clusters: Tensor) -> Tensor:
        """Cluster ids (any shape and device) -> class ids; clusters without a class become -1."""
        return self.cluster_to_class.to(clusters.device)[clusters.long()]

    def per_class_iou(self, class_names: Sequence[str]) -> dict[str, float]:
        """{class name: IoU in percent} after compute(); NaN for a class never labelled and never predicted."""
        if len(class_names) != self.n_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.n_classes} classes")
        iou = _iou(*self._class_counts())
        return {name: PERCENT * float(value) for name, value in zip(class_names, iou)}

    def _match(self, stats: Tensor) -> Tensor:
        mapping = torch.full((self.n_clusters,), -1, dtype=torch.int64)
        if not self.compute_hungarian:
            mapping[: self.n_classes] = torch.arange(self.n_classes)
            return mapping
        # Legacy mode: the extra clusters' rows are empty by construction, so only clusters 0..n_classes-1 compete.
        candidates = stats[: self.n_classes] if self.legacy_extra_cluster_mask else stats
        clusters, classes = linear_sum_assignment(candidates.numpy(), maximize=True)
        mapping[torch.from_numpy(clusters)] = torch.from_numpy(classes)
        return mapping

    def _require_computed(self) -> None:
        if self._cluster_to_class is None:
            raise RuntimeError(f"{self.prefix}metrics: call compute() before using the cluster assignment")

    def _class_counts(self) -> tuple[Tensor, Tensor, Tensor]:
        stats = self.confusion
        predicted = stats[self.cluster_order()[: self.n_classes]].double()  # row c: the cluster matched to class c
        tp = predicted.diagonal()
        fp = predicted.sum(dim=1) - tp
        fn = stats.sum(dim=0).double() - tp  # includes the pixels of class c in unmatched clusters
        return tp, fp, fn


def _iou(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    union = tp + fp + fn
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))


def _nanmean(values: Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan


def get_metrics(cluster_metric: UnsupervisedMetrics, linear_metric: UnsupervisedMetrics) -> dict[str, float]:
    """Both metrics' compute() results in one dict, under the names the original printed (logs keep them)."""
    return {**cluster_metric.compute(), **linear_metric.compute()}


def plot_confusion_matrix(metric: UnsupervisedMetrics, class_names: Sequence[str], path: Union[str, Path]) -> None:
    """Save ``confusion_matrix_figure`` as a PNG."""
    fig = confusion_matrix_figure(metric, class_names)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=CM_DPI, format="png")


def confusion_matrix_figure(metric: UnsupervisedMetrics, class_names: Sequence[str]) -> Figure:
    """The row-normalised confusion matrix (true class x matched cluster) of a computed metric, each cell's share
    written in it (blank below CM_VALUE_MIN), with the class names and the probe's mIoU.

    Column i is the cluster matched to class i; the unmatched extra clusters follow, labelled by their id.
    """
    if len(class_names) != metric.n_classes:
        raise ValueError(f"got {len(class_names)} class names for {metric.n_classes} classes")
    order = metric.cluster_order()
    matrix = metric.confusion[order].T.double()  # true class x cluster, clusters in class order
    matrix = (matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1)).numpy()
    columns = list(class_names) + [f"extra {int(cluster)}" for cluster in order[metric.n_classes:]]

    n_rows, n_cols = matrix.shape
    width = CM_LABEL_INCHES + CM_BAR_INCHES + CM_CELL_INCHES * n_cols
    height = CM_LABEL_INCHES + CM_PAD_INCHES + CM_CELL_INCHES * n_rows
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((CM_LABEL_INCHES / width, CM_PAD_INCHES / height,
                       CM_CELL_INCHES * n_cols / width, CM_CELL_INCHES * n_rows / height))
    image = ax.imshow(matrix, cmap=matplotlib.colormaps[CM_COLORMAP], vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    for (row, col), share in np.ndenumerate(matrix):
        if share >= CM_VALUE_MIN:
            ax.text(col, row, f"{share:.2f}", ha="center", va="center", fontsize=CM_VALUE_FONT_SIZE,
                    color="white" if share > CM_DARK else "black")
    ax.set_xticks(np.arange(n_cols), columns, rotation=90, fontsize=CM_FONT_SIZE)
    ax.set_yticks(np.arange(n_rows), list(class_names), fontsize=CM_FONT_SIZE)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xlabel("matched cluster (named by its class)" if metric.compute_hungarian else "predicted class",
                  fontsize=CM_FONT_SIZE)
    ax.set_ylabel("true class (each row sums to 1)", fontsize=CM_FONT_SIZE)
    ax.set_xticks(np.arange(n_cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n_rows + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    cax = fig.add_axes(((CM_LABEL_INCHES + CM_CELL_INCHES * n_cols + 0.15) / width, CM_PAD_INCHES / height,
                        0.15 / width, CM_CELL_INCHES * n_rows / height))
    fig.colorbar(image, cax=cax).ax.tick_params(labelsize=CM_FONT_SIZE)
    mean_iou = PERCENT * _nanmean(_iou(*metric._class_counts()))  # as compute() gave it, without its process sync
    fig.text(CM_LABEL_INCHES / width, 0.1 / height, f"{metric.prefix.rstrip('_').lower()} probe, mIoU {mean_iou:.2f}\n"
             f"row: where a class's pixels go", fontsize=CM_FONT_SIZE)
    return fig
