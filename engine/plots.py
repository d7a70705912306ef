"""Colour label maps and save image / prediction grids as PNG (matplotlib's Agg canvas, no pyplot state)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from utils.files import atomic_output

GRID_DPI = 100
PANEL_INCHES = 2.5  # one image or label map, margins included
PANEL_MARGIN_INCHES = 0.05  # white space around each panel
TITLE_INCHES = 0.25  # band above the first row for the column titles
LEGEND_ROW_INCHES = 0.25  # one row of the class legend below the grid
LEGEND_ENTRY_INCHES = 1.25  # width of one legend entry (colour patch and class name)
FONT_SIZE = 8
UINT8_MAX = 255


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours from a Kx3 uint8 palette; ids outside [0, K) (e.g. -1) are black."""
    if labels.ndim != 2:
        raise ValueError(f"labels must be an HxW array, got shape {labels.shape}")
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.dtype != np.uint8:
        raise ValueError(f"colors must be a Kx3 uint8 array, got shape {colors.shape} and dtype {colors.dtype}")
    out = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = (labels >= 0) & (labels < len(colors))
    out[valid] = colors[labels[valid]]
    return out


def legend_columns(n_panel_columns: int) -> int:
    """Legend entries per row under a grid of that many panel columns."""
    return max(1, int(n_panel_columns * PANEL_INCHES / LEGEND_ENTRY_INCHES))


def save_segmentation_grid(path: Union[str, Path], rows: Sequence[Mapping[str, np.ndarray]],
                           class_names: Sequence[str], colors: np.ndarray) -> None:
    """Save one PNG with a row per image and a column per entry, titled with the entry names, and a class legend.

    Every row maps the same names, in the same order, to HxWx3 uint8 images (drawn as they are) or HxW label
    maps (drawn with ``colorize``), e.g. {"image", "ground truth", "linear", "cluster", "linear + CRF", ...}.
    """
    if not rows:
        raise ValueError("no rows to draw")
    titles = list(rows[0])
    if any(list(row) != titles for row in rows):
        raise ValueError(f"every row must hold the entries {titles}, in that order")
    if len(colors) != len(class_names):
        raise ValueError(f"got {len(colors)} colours for {len(class_names)} class names")

    n_rows, n_cols = len(rows), len(titles)
    n_legend_rows = math.ceil(len(class_names) / legend_columns(n_cols))
    width = n_cols * PANEL_INCHES
    legend_height = n_legend_rows * LEGEND_ROW_INCHES
    height = TITLE_INCHES + n_rows * PANEL_INCHES + legend_height
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    inner = PANEL_INCHES - 2 * PANEL_MARGIN_INCHES
    for r, row in enumerate(rows):
        bottom = legend_height + (n_rows - 1 - r) * PANEL_INCHES + PANEL_MARGIN_INCHES
        for c, (title, array) in enumerate(row.items()):
            left = c * PANEL_INCHES + PANEL_MARGIN_INCHES
            ax = fig.add_axes((left / width, bottom / height, inner / width, inner / height))
            if array.ndim == 2:
                ax.imshow(colorize(array, colors), interpolation="nearest")
            else:
                ax.imshow(array)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=FONT_SIZE)
    handles = [Patch(facecolor=color / UINT8_MAX, edgecolor="none", label=name)
               for name, color in zip(class_names, colors)]
    fig.legend(handles=handles, loc="lower center", ncol=legend_columns(n_cols), fontsize=FONT_SIZE, frameon=False,
               borderaxespad=0.0, handlelength=1.0, columnspacing=0.8)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=GRID_DPI, format="png")


CURVE_PANELS = (  # (title, [(log.jsonl key, record type, label)]) of curves.png
    ("loss", [("loss", "train", "total"), ("ppap", "train", "PPAP")]),
    ("probe losses", [("linear", "train", "linear probe"),
                      ("cluster", "train", "cluster probe (second stage: its cross-entropy)")]),
    # the first stage mines per anchor; a second stage mines nothing (without ppap_weight) and has pseudo-labels
    ("per anchor (first stage), pseudo-labels (second)", [("num_pos", "train", "positives"),
                                                          ("num_neg", "train", "confident negatives"),
                                                          ("pseudo_kept", "train", "fraction of pixels kept")]),
    ("network learning rate", [("lr", "train", "lr")]),
    ("gradient norm (before clipping)", [("grad_norm", "train", "grad norm")]),
    ("validation (%)", [("Cluster_mIoU", "val", "Cluster mIoU"), ("Cluster_Accuracy", "val", "Cluster Acc"),
                        ("Linear_mIoU", "val", "Linear mIoU"), ("Linear_Accuracy", "val", "Linear Acc")]),
    ("label-free: cluster similarity, stability", [("cluster_similarity", "val", "similarity to centroid"),
                                                    ("stability", "val", "stability (ARI)")]),
    ("label-free: effective rank (RankMe)", [("rankme", "val", "RankMe")]),
    ("label-free: PPAP loss on validation", [("ppap_loss", "val", "PPAP loss")]),
)
CURVE_PANEL_INCHES = (4.5, 2.8)  # width, height of one panel
CURVE_MARKERS_UP_TO = 50  # points of a curve drawn with markers


def save_curves(records: Sequence[Mapping[str, object]], path: Union[str, Path]) -> None:
    """``curves.png`` of a run from its log.jsonl records: losses, positives and negatives per anchor, learning rate,
    gradient norm and the validation metrics against the iteration (two columns of panels)."""
    cols, rows = 2, math.ceil(len(CURVE_PANELS) / 2)
    fig = Figure(figsize=(cols * CURVE_PANEL_INCHES[0], rows * CURVE_PANEL_INCHES[1]), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, curves) in enumerate(CURVE_PANELS):
        ax = fig.add_subplot(rows, cols, i + 1)
        for key, kind, label in curves:
            points = [(r["iter"], r[key]) for r in records
                      if r.get("type") == kind and isinstance(r.get(key), (int, float))]
            if points:  # markers where there are few points (validations, short runs), so that one point shows
                ax.plot(*zip(*points), marker="o" if len(points) <= CURVE_MARKERS_UP_TO else None, markersize=3,
                        label=label)
        ax.set_title(title, fontsize=FONT_SIZE + 1)
        ax.set_xlabel("iteration", fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE)
        ax.grid(alpha=0.3)
        if len(curves) > 1 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=FONT_SIZE, frameon=False)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=GRID_DPI, format="png")


GROUP_PANELS = (("Cluster_mIoU", "Cluster mIoU (%)"), ("Cluster_Accuracy", "Cluster accuracy (%)"),
                ("Linear_mIoU", "Linear mIoU (%)"), ("Linear_Accuracy", "Linear accuracy (%)"))
SEED_LINE_ALPHA, SPREAD_ALPHA = 0.35, 0.15


def mean_and_range(series: Sequence[Mapping[int, float]]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """The iterations at which every run of ``series`` (iteration -> value, one mapping per run) has a value, and
    there the mean, the minimum and the maximum over the runs."""
    common = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not common:
        return [], np.zeros(0), np.zeros(0), np.zeros(0)
    values = np.array([[s[t] for t in common] for s in series], dtype=np.float64)
    return common, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def save_group_curves(groups: Mapping[str, Sequence[Sequence[Mapping[str, object]]]], path: Union[str, Path]) -> None:
    """The validation metrics against the iteration of many runs (``groups``: group name -> the log.jsonl records of
    each of its runs): per group one colour, a thin line per run, the mean over the runs (at the iterations every run
    reached) as a thick line and their range (min-max) shaded."""
    cols, rows = 2, math.ceil(len(GROUP_PANELS) / 2)
    fig = Figure(figsize=(cols * CURVE_PANEL_INCHES[0], rows * CURVE_PANEL_INCHES[1] + 0.3 * len(groups)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    palette = [f"C{i % 10}" for i in range(len(groups))]
    for i, (key, title) in enumerate(GROUP_PANELS):
        ax = fig.add_subplot(rows, cols, i + 1)
        for color, (group, runs) in zip(palette, groups.items()):
            series = [{r["iter"]: r[key] for r in records
                       if r.get("type") == "val" and isinstance(r.get(key), (int, float))} for records in runs]
            series = [s for s in series if s]
            for s in series:  # each run, with its points marked when there are few (one validation shows)
                ax.plot(list(s), list(s.values()), color=color, alpha=SEED_LINE_ALPHA, linewidth=0.8,
                        marker="." if len(s) <= CURVE_MARKERS_UP_TO else None)
            common, mean, low, high = mean_and_range(series)
            if not common:
                continue
            ax.fill_between(common, low, high, color=color, alpha=SPREAD_ALPHA, linewidth=0)
            ax.plot(common, mean, color=color, linewidth=2,
                    marker="o" if len(common) <= CURVE_MARKERS_UP_TO else None, markersize=3,
                    label=f"{group} (mean of {len(series)})")
        ax.set_title(title, fontsize=FONT_SIZE + 1)
        ax.set_xlabel("iteration", fontsize=FONT_SIZE)
        ax.tick_params(labelsize=FONT_SIZE)
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=FONT_SIZE, frameon=False)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=GRID_DPI, format="png")


IOU_CLASS_INCHES = 0.6  # width of one class's group of bars
IOU_HEIGHT_INCHES = 4.5
IOU_MARGIN_INCHES = 1.2  # left and right, for the axis label and the legend
IOU_BEFORE_ALPHA = 0.5  # the bars before CRF are lighter than those after


def save_per_class_iou(no_crf: Mapping[str, Mapping[str, float]], crf: Optional[Mapping[str, Mapping[str, float]]],
                       path: Union[str, Path]) -> None:
    """Save ``per_class_iou_figure`` as a PNG."""
    fig = per_class_iou_figure(no_crf, crf)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=GRID_DPI, format="png")


def per_class_iou_figure(no_crf: Mapping[str, Mapping[str, float]],
                         crf: Optional[Mapping[str, Mapping[str, float]]]) -> Figure:
    """One group of bars per class: its IoU (percent) for each probe (``no_crf``: {"cluster": {class name: IoU},
    "linear": ...}), and after CRF (``crf``, same layout, or None) in the same colour, darker; the mean over the classes
    in the legend. A class without IoU (never labelled nor predicted: NaN) has no bar."""
    series = [(f"{probe}", values, i, IOU_BEFORE_ALPHA) for i, (probe, values) in enumerate(no_crf.items())]
    if crf is not None:
        series = [entry for i, (probe, values) in enumerate(crf.items())
                  for entry in (series[i], (f"{probe} + CRF", values, i, 1.0))]
    names = list(next(iter(no_crf.values())))
    width = 2 * IOU_MARGIN_INCHES + IOU_CLASS_INCHES * len(names)
    fig = Figure(figsize=(width, IOU_HEIGHT_INCHES), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bar = 0.8 / len(series)
    for i, (label, values, color, alpha) in enumerate(series):
        heights = np.array([values.get(name, math.nan) for name in names], dtype=np.float64)
        finite = heights[np.isfinite(heights)]
        mean = f"{finite.mean():.2f}" if finite.size else "-"
        ax.bar(np.arange(len(names)) - 0.4 + bar * (i + 0.5), np.nan_to_num(heights, nan=0.0), width=bar,
               label=f"{label} (mIoU {mean})", color=f"C{color}", alpha=alpha)
    ax.set_xticks(np.arange(len(names)), names, rotation=45, ha="right", fontsize=FONT_SIZE + 1)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylim(0, 100)
    ax.tick_params(axis="y", labelsize=FONT_SIZE)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylabel("per-class IoU (%)", fontsize=FONT_SIZE + 1)
    fig.legend(fontsize=FONT_SIZE + 1, frameon=False, ncol=len(series), loc="outside upper center")
    return fig
