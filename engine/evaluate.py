"""Evaluation: one pass of the network over the validation set, scored before and (optionally) after dense CRF.

``evaluate()`` is the one evaluation loop: run.py validates with it during training and evaluates best.pth and
last.pth at the end; eval.py evaluates a saved or released checkpoint with it. As the original:
- the code is upsampled bilinearly (align_corners False) to the label size before the probes;
- linear prediction = argmax of the linear probe; cluster prediction = the nearest centroid (one-hot argmax);
- for the CRF: log-softmax of the linear logits, and log-softmax(2 x cosine similarities) of the cluster probe;
- ``eval.is_direct``: the cluster probe takes the code itself as its similarities.
Unlike the original, which ran the network twice (once without, once with CRF), one pass feeds both: the CRF
runs in worker processes on the images of earlier batches while the network computes the next one.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from dataset import build_dataset, class_names, color_map, require_labels
from engine.checkpoint import networks_from_checkpoint
from utils.checkpoint import load_checkpoint
from utils.config import Config, EvalConfig
from utils.crf import CRFPool
from utils.device import autocast, resolve_device, resolve_precision
from utils.errors import ConfigError
from utils.image import denormalize_to_uint8
from utils.metrics import CLUSTER_PREFIX, LINEAR_PREFIX, UnsupervisedMetrics, get_metrics, plot_confusion_matrix
from utils.tracking import Tracker
from utils.visualize import save_segmentation_grid

CRF_CLUSTER_ALPHA = 2.0  # the original feeds log_softmax(2 x similarities) of the cluster probe to the CRF
EVAL_BATCH_SIZE = 8  # validation batch size of the original run.py
METRIC_NAMES = ("Cluster_mIoU", "Cluster_Accuracy", "Linear_mIoU", "Linear_Accuracy")


@dataclass
class Scores:
    """The two metrics of one setting (without or with CRF), computed."""

    cluster: UnsupervisedMetrics
    linear: UnsupervisedMetrics
    values: dict[str, float] = field(default_factory=dict)

    def per_class_iou(self, class_names: list[str]) -> dict[str, dict[str, Optional[float]]]:
        return {"cluster": _finite(self.cluster.per_class_iou(class_names)),
                "linear": _finite(self.linear.per_class_iou(class_names))}


@dataclass
class Evaluation:
    no_crf: Scores
    crf: Optional[Scores]
    loss: float  # mean cluster-probe loss, the original's validation loss
    n_images: int
    examples: list[dict[str, np.ndarray]]  # the first images with their predictions, for visualisation

    def metrics(self) -> dict[str, dict[str, float]]:
        out = {"no_crf": self.no_crf.values}
        if self.crf is not None:
            out["crf"] = self.crf.values
        return out


def _metric_pair(n_classes: int, cfg: EvalConfig, device: torch.device) -> tuple[UnsupervisedMetrics, UnsupervisedMetrics]:
    cluster = UnsupervisedMetrics(CLUSTER_PREFIX, n_classes, cfg.extra_clusters, True,
                                  legacy_extra_cluster_mask=cfg.legacy_extra_cluster_mask).to(device)
    linear = UnsupervisedMetrics(LINEAR_PREFIX, n_classes, 0, False).to(device)
    return cluster, linear


@torch.inference_mode()
def evaluate(net: nn.Module, linear_probe: nn.Module, cluster_probe: nn.Module, loader: DataLoader,
             device: torch.device, precision: str, cfg: EvalConfig, n_classes: int, crf: bool = False,
             n_examples: int = 0, desc: str = "eval") -> Evaluation:
    """Score the probes on ``loader`` (labelled, 320 px); with ``crf`` also after dense-CRF refinement."""
    modules = (net, linear_probe, cluster_probe)
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    no_crf, with_crf = _metric_pair(n_classes, cfg, device), (_metric_pair(n_classes, cfg, device) if crf else None)
    losses, n_images, examples = [], 0, []
    pending: dict[int, Tensor] = {}  # labels of images whose CRF result has not come back yet
    crf_results: dict[tuple[int, str], np.ndarray] = {}  # CRF maps of the example images
    pool = CRFPool(cfg.crf_workers, output="labels") if crf else contextlib.nullcontext()
    crf_bar = tqdm(total=2 * len(loader.dataset), desc=f"{desc} CRF", leave=False, disable=None if crf else True)
    try:
        with pool, crf_bar:
            for batch in tqdm(loader, desc=desc, leave=False, disable=None):
                img = batch["img"].to(device, non_blocking=True)
                label = batch["label"].to(device, non_blocking=True)
                with autocast(device, precision):
                    code = net(img).code
                    code = F.interpolate(code, label.shape[-2:], mode="bilinear", align_corners=False)
                    linear_logits = linear_probe(code)
                    cluster_out = cluster_probe(code, None, is_direct=cfg.is_direct)
                linear_pred, cluster_pred = linear_logits.argmax(1), cluster_out.inner.argmax(1)
                no_crf[0].update(cluster_pred, label)
                no_crf[1].update(linear_pred, label)
                losses.append(float(cluster_out.loss))
                shown = min(img.shape[0], max(n_examples - n_images, 0))  # images of this batch to visualise
                images = [denormalize_to_uint8(img[j]) for j in range(img.shape[0] if crf else shown)]
                for j in range(shown):
                    examples.append({"image": images[j], "ground truth": _np(label[j]),
                                     "linear": _np(linear_pred[j]), "cluster": _np(cluster_pred[j])})
                if crf:
                    linear_log = F.log_softmax(linear_logits.float(), dim=1).cpu().numpy()
                    cluster_log = F.log_softmax(CRF_CLUSTER_ALPHA * cluster_out.inner.float(), dim=1).cpu().numpy()
                    for j, image in enumerate(images):
                        index = n_images + j
                        pending[index] = label[j]
                        pool.submit((index, "linear"), image, linear_log[j])
                        pool.submit((index, "cluster"), image, cluster_log[j])
                    _collect(pool.ready(), pending, with_crf, crf_results, n_examples, device, crf_bar)
                n_images += img.shape[0]
            if crf:
                _collect(pool.results(), pending, with_crf, crf_results, n_examples, device, crf_bar)
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)
    scores_no_crf = _scores(*no_crf)
    scores_crf = _scores(*with_crf) if crf else None
    for index, example in enumerate(examples):
        example["cluster"] = _mapped(scores_no_crf.cluster, example["cluster"])
        if crf:
            example["linear + CRF"] = crf_results[(index, "linear")]
            example["cluster + CRF"] = _mapped(scores_crf.cluster, crf_results[(index, "cluster")])
    return Evaluation(no_crf=scores_no_crf, crf=scores_crf, loss=float(np.mean(losses)) if losses else math.nan,
                      n_images=n_images, examples=examples)


def _collect(results, pending: dict[int, Tensor], metrics, examples: dict, n_examples: int, device: torch.device,
             bar: tqdm) -> None:
    for (index, kind), labels in results:
        bar.update()
        target = pending[index]
        pred = torch.from_numpy(labels).to(device)
        (metrics[0] if kind == "cluster" else metrics[1]).update(pred, target)
        if index < n_examples:
            examples[(index, kind)] = labels
        if kind == "cluster":  # submitted second: the image is done
            del pending[index]


def _scores(cluster: UnsupervisedMetrics, linear: UnsupervisedMetrics) -> Scores:
    return Scores(cluster=cluster, linear=linear, values=get_metrics(cluster, linear))


def _mapped(metric: UnsupervisedMetrics, clusters: np.ndarray) -> np.ndarray:
    return metric.map_clusters(torch.from_numpy(clusters)).numpy()


def _np(t: Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _finite(values: dict[str, float]) -> dict[str, Optional[float]]:
    """NaN (a class never labelled nor predicted) becomes None, so the JSON stays valid."""
    return {k: (None if math.isnan(v) else v) for k, v in values.items()}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Metrics as a text table: one row per setting ("before CRF", ...), one column per metric name."""
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + "".join(f"{m:>18s}" for m in METRIC_NAMES)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}s}" + "".join(f"{values.get(m, math.nan):18.2f}" for m in METRIC_NAMES))
    return "\n".join(lines)


def save_report(evaluation: Evaluation, out_dir: Path, class_names: list[str], colors: np.ndarray,
                checkpoint: str, prefix: str = "") -> dict[str, Path]:
    """Write ``{prefix}eval_report.json``, the confusion matrix and the visualisation; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {**evaluation.metrics(),
                              "per_class_iou": evaluation.no_crf.per_class_iou(class_names),
                              "checkpoint": checkpoint, "n_images": evaluation.n_images}
    if evaluation.crf is not None:
        report["per_class_iou_crf"] = evaluation.crf.per_class_iou(class_names)
    paths = {"report": out_dir / f"{prefix}eval_report.json",
             "confusion_matrix": out_dir / f"{prefix}confusion_matrix.png"}
    paths["report"].write_text(json.dumps(report, indent=2) + "\n")
    plot_confusion_matrix(evaluation.no_crf.cluster, class_names, paths["confusion_matrix"])
    if evaluation.examples:
        paths["visualization"] = out_dir / f"{prefix}visualization.png"
        save_segmentation_grid(paths["visualization"], evaluation.examples, class_names, colors)
    return paths


CKPT_FILE = "ckpt.pth"  # the file name the original eval.py loads from {output_dir}/{checkpoint}/


def checkpoint_path(cfg: Config, override: Optional[str]) -> Path:
    """``--checkpoint`` (a file, or a folder holding ckpt.pth), else ``{output_dir}/{checkpoint}`` likewise."""
    if override:
        path = Path(override)
    elif cfg.checkpoint:
        path = Path(cfg.output_dir) / cfg.checkpoint
    else:
        raise ConfigError("no checkpoint to evaluate: set \"checkpoint\" in the option file (eval.py then loads "
                          "{output_dir}/{checkpoint}/ckpt.pth) or pass --checkpoint FILE")
    return path / CKPT_FILE if path.is_dir() else path


def evaluate_checkpoint(cfg: Config, path: Path, out_dir: Path, tracker: Tracker) -> dict[str, Path]:
    """eval.py's work: the val split at 320 px, before and (with eval.is_crf) after CRF; report files written."""
    device = resolve_device(cfg.device, cfg.gpu_ids)
    precision = resolve_precision(cfg.precision, device)
    val_set = build_dataset(cfg.dataset, "val")
    require_labels(val_set)
    ckpt = load_checkpoint(path)
    net, linear, cluster = networks_from_checkpoint(ckpt, cfg.model, val_set.n_classes, str(path))
    for module in (net, linear, cluster):
        module.to(device)
    loader = make_loader(val_set, cfg, device, batch_size=EVAL_BATCH_SIZE)
    ev = evaluate(net, linear, cluster, loader, device, precision, cfg.eval, val_set.n_classes, crf=cfg.eval.is_crf,
                  n_examples=cfg.eval.n_images if cfg.eval.is_visualize else 0)
    names, colors = class_names(cfg.dataset), color_map(cfg.dataset)
    paths = save_report(ev, out_dir, names, colors, checkpoint=str(path))
    rows = {"before CRF": ev.no_crf.values}
    if ev.crf is not None:
        rows["after CRF"] = ev.crf.values
    print(f"{path}: {ev.n_images} images of {cfg.dataset.data_type} val")
    print(format_table(rows))
    tracker.log({f"{k}{'' if name == 'before CRF' else '_crf'}": v for name, values in rows.items()
                 for k, v in values.items()}, step=0)
    tracker.log_images({k: v for k, v in paths.items() if k != "report"}, step=0)
    return paths


def _seed_worker(worker_id: int) -> None:
    """Seed numpy and python in a data-loader worker from its torch seed (torch seeds itself per worker)."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(dataset: Dataset, cfg: Config, device: torch.device, batch_size: int,
                sampler: Optional[Sampler] = None, drop_last: bool = False) -> DataLoader:
    """A data loader as training and evaluation use it: seeded, pinned on CUDA, persistent workers."""
    workers = cfg.dataloader.num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                      num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      worker_init_fn=_seed_worker, generator=torch.Generator().manual_seed(cfg.seed))
