"""Evaluation: one pass of the network over an evaluation split, scored before and (optionally) after dense CRF.

``evaluate()`` is the one evaluation loop: training validates with it, on the validation split.
``evaluate_and_report()`` is the one evaluation of saved checkpoints, behind eval.py, the end of a training run and
``run.py --test``, on the split ``eval.split`` (val, or a 'directory' set's test split). What is computed:
- the image goes into the network at 320 x 320 (``eval.res``), or at the nearest multiple of the patch size (322 x
  322 for a patch of 14; bilinear resize); the code is upsampled bilinearly (align_corners False) to the label size
  before the probes, so every pixel of the 320 x 320 label gets its own prediction;
- linear prediction = argmax of the linear probe; cluster prediction = the nearest centroid (one-hot argmax);
- for the CRF: log-softmax of the linear logits, and log-softmax(2 x cosine similarities) of the cluster probe
  (the sharpening by 2 is the setting PPAP's and STEGO's published CRF numbers were computed with);
- ``eval.is_direct``: the cluster probe takes the code itself as its similarities.
The original ran the network twice (once without, once with CRF); here one pass feeds both: the CRF runs in
worker processes on the images of earlier batches while the network computes the next one.

Data-parallel (``torchrun``): each process evaluates its contiguous share of the images (every image once, no
padding), with its own CRF pool; the confusion matrices are summed over the processes when the metrics are computed,
so the metrics are those of one process; process 0 prints, writes the reports and logs to wandb.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from config import EVALUATION_INPUT, Config, EvalConfig, config_from_dict, config_to_dict, option_keys
from crf.refiner import Refiner, overlaps_network
from dataset import SegmentationDataset, build_dataset, class_names, color_map, make_loader, require_labels
from dataset.classes import pascal_color_map
from dataset.image import denormalize_batch
from engine.checkpoint import config_differences, networks_from_checkpoint
from engine.criteria import LabelFree
from engine.metrics import CLUSTER_PREFIX, LINEAR_PREFIX, UnsupervisedMetrics, get_metrics, plot_confusion_matrix
from engine.plots import save_per_class_iou, save_segmentation_grid
from engine.rundir import CKPT_FILE, METRIC_NAMES, SETTINGS
from engine.tracking import Tracker
from model.ppap import NetOutput, fit_to_patches
from utils import signals
from utils.device import autocast
from utils.distributed import ONE_PROCESS, World
from utils.errors import ConfigError, WeightsError
from utils.files import to_json, write_text_atomically

log = logging.getLogger(__name__)

CRF_CLUSTER_ALPHA = 2.0  # the cluster probe's similarities are sharpened by this factor before the CRF
EVAL_BATCH_SIZE = 8  # validation batch size of the original training script
EVALUATION_SECTIONS = option_keys(EVALUATION_INPUT)  # the options an evaluation depends on: dataset, model, eval


@dataclass
class Scores:
    """The cluster probe's and the linear probe's metrics in one setting (before or after CRF)."""

    cluster: UnsupervisedMetrics
    linear: UnsupervisedMetrics
    values: dict[str, float] = field(default_factory=dict)  # the four metrics by name, set by compute()

    @classmethod
    def empty(cls, n_classes: int, cfg: EvalConfig, device: torch.device) -> Scores:
        return cls(cluster=UnsupervisedMetrics(CLUSTER_PREFIX, n_classes, cfg.extra_clusters, True,
                                               legacy_extra_cluster_mask=cfg.legacy_extra_cluster_mask).to(device),
                   linear=UnsupervisedMetrics(LINEAR_PREFIX, n_classes, 0, False).to(device))

    def compute(self) -> Scores:
        """Match clusters to classes and compute the metrics, once all predictions are counted."""
        self.values = get_metrics(self.cluster, self.linear)
        return self

    def per_class_iou(self, class_names: list[str]) -> dict[str, dict[str, float]]:
        """{probe: {class name: IoU}}; NaN for a class never labelled nor predicted (null in the JSON reports)."""
        return {"cluster": self.cluster.per_class_iou(class_names), "linear": self.linear.per_class_iou(class_names)}


@dataclass
class Evaluation:
    no_crf: Scores
    crf: Optional[Scores]
    loss: float  # the cluster probe's loss, mean over the images (the original's validation loss averaged the batches)
    n_images: int
    examples: list[dict[str, np.ndarray]]  # the first images with their predictions, for visualisation
    seconds: float = math.nan  # the whole evaluation, in this process
    crf_seconds: float = 0.0  # of which on the CRF: refining here, or handing images to the pool and waiting for it

    def matching(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The cluster probe's clusters matched to classes: ``{"classes": names, "no_crf": [class id of cluster k, or
        -1], "crf": [...]}`` (no "crf" without CRF)."""
        out: dict[str, Any] = {"classes": list(class_names),
                               "no_crf": self.no_crf.cluster.cluster_to_class.tolist()}
        if self.crf is not None:
            out["crf"] = self.crf.cluster.cluster_to_class.tolist()
        return out

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{"no_crf": {metric: value}, "crf": {...}}`` (no "crf" without CRF), values in percent."""
        out = {"no_crf": self.no_crf.values}
        if self.crf is not None:
            out["crf"] = self.crf.values
        return out


class ProbeOutputs(NamedTuple):
    """One batch through the network and both probes, at the labels' size."""

    linear_logits: Tensor  # B x C x H x W
    cluster_inner: Tensor  # B x K x H x W: cosine similarities to the centroids (the code itself with is_direct)
    cluster_loss: Tensor  # the cluster probe's loss, a mean over the batch's images
    net: NetOutput  # the network's output for the images (not mirrored)
    code: Tensor  # B x D x h x w: the code the probes see, on the patch grid

    def crf_maps(self) -> list[Tensor]:
        """The maps the CRF refines: log-softmax of the linear logits, and of the sharpened cluster similarities."""
        return [F.log_softmax(self.linear_logits.float(), dim=1),
                F.log_softmax(CRF_CLUSTER_ALPHA * self.cluster_inner.float(), dim=1)]


def probe_outputs(net: nn.Module, linear_probe: nn.Module, cluster_probe: nn.Module, img: Tensor,
                  size: tuple[int, int], tta: bool, is_direct: bool) -> ProbeOutputs:
    """The probes on the code of ``img`` (``segment_code``), upsampled bilinearly to ``size``."""
    out, code = network_code(net, img, tta)
    upsampled = F.interpolate(code, size, mode="bilinear", align_corners=False)
    cluster_out = cluster_probe(upsampled, is_direct=is_direct)
    return ProbeOutputs(linear_probe(upsampled), cluster_out.inner, cluster_out.loss, out, code)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """The modules in eval mode for the block, then back in the mode each had."""
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, was_training):
            m.train(mode)


class Evaluator:
    """Scores batches of predictions (``process``) and, at the end, the whole evaluation (``result``): both probes
    before and, with a ``refiner``, after dense CRF, the cluster probe's loss and the first images with their maps.

    The refiner refines each batch's images (``CRF_MAPS``, both probes' maps) as the batch is processed; a pool
    gives them back later, while the network computes the next batches, so labels wait in ``pending``."""

    CRF_MAPS = ("linear", "cluster")  # the maps of ProbeOutputs.crf_maps, in its order

    def __init__(self, n_classes: int, cfg: EvalConfig, device: torch.device, refiner: Optional[Refiner],
                 n_examples: int, crf_bar: tqdm) -> None:
        self.device, self.refiner, self.n_examples, self.crf_bar = device, refiner, n_examples, crf_bar
        self.no_crf = Scores.empty(n_classes, cfg, device)
        self.crf = Scores.empty(n_classes, cfg, device) if refiner is not None else None
        self.loss_sum, self.n_images, self.crf_seconds = 0.0, 0, 0.0
        self.examples: list[dict[str, np.ndarray]] = []
        self.pending: dict[int, Tensor] = {}  # labels of images whose CRF result has not come back yet
        self.crf_examples: dict[tuple[int, str], np.ndarray] = {}  # CRF maps of the example images

    def process(self, img: Tensor, label: Tensor, out: ProbeOutputs) -> None:
        linear_pred, cluster_pred = out.linear_logits.argmax(1), out.cluster_inner.argmax(1)
        self.no_crf.cluster.update(cluster_pred, label)
        self.no_crf.linear.update(linear_pred, label)
        self.loss_sum += float(out.cluster_loss) * img.shape[0]
        shown = min(img.shape[0], max(self.n_examples - self.n_images, 0))  # images of this batch to visualise
        rgb = denormalize_batch(img) if self.refiner is not None or shown else None
        for j in range(shown):
            self.examples.append({"image": _np(rgb[j]), "ground truth": _np(label[j]),
                                  "linear": _np(linear_pred[j]), "cluster": _np(cluster_pred[j])})
        if self.refiner is not None:
            maps = out.crf_maps()
            start = _clock(self.device)
            keys = range(self.n_images, self.n_images + img.shape[0])
            self.pending.update(zip(keys, label))
            self.refiner.submit(keys, rgb, maps)
            self._collect(self.refiner.ready())
            self.crf_seconds += _clock(self.device) - start
        self.n_images += img.shape[0]

    def finish(self) -> None:
        """Wait for the images still being refined."""
        if self.refiner is not None:
            start = _clock(self.device)
            self._collect(self.refiner.results())
            self.crf_seconds += _clock(self.device) - start

    def _collect(self, refined: Iterator[tuple[int, list[Tensor]]]) -> None:
        for index, maps in refined:
            label = self.pending.pop(index)
            for kind, labels in zip(self.CRF_MAPS, maps):
                getattr(self.crf, kind).update(labels, label)
                if index < self.n_examples:
                    self.crf_examples[(index, kind)] = _np(labels)
            self.crf_bar.update(len(maps))

    def result(self, world: World, seconds: float) -> Evaluation:
        """The metrics of all processes' images (confusion matrices and loss summed over them)."""
        loss_sum, n_images = world.sum(torch.tensor([self.loss_sum, self.n_images], dtype=torch.float64,
                                                    device=self.device)).tolist()
        self.no_crf.compute()
        if self.crf is not None:
            self.crf.compute()
        for index, example in enumerate(self.examples):
            example["cluster"] = _mapped(self.no_crf.cluster, example["cluster"])
            if self.crf is not None:
                example["linear + CRF"] = self.crf_examples[(index, "linear")]
                example["cluster + CRF"] = _mapped(self.crf.cluster, self.crf_examples[(index, "cluster")])
        return Evaluation(no_crf=self.no_crf, crf=self.crf, loss=loss_sum / n_images if n_images else math.nan,
                          n_images=int(n_images), examples=self.examples, seconds=seconds,
                          crf_seconds=self.crf_seconds)


@torch.inference_mode()
def evaluate(net: nn.Module, linear_probe: nn.Module, cluster_probe: nn.Module, loader: DataLoader,
             device: torch.device, precision: str, cfg: EvalConfig, n_classes: int, crf: bool = False,
             n_examples: int = 0, desc: str = "eval", world: World = ONE_PROCESS, tta: bool = False,
             label_free: Optional[LabelFree] = None) -> Evaluation:
    """Score the probes on ``loader`` (labelled, 320 px); with ``crf`` also after dense-CRF refinement; with ``tta``
    on the code averaged with that of the mirrored image (``segment_code``); with ``label_free``, collect its
    criteria from the same forward passes.

    With several processes, ``loader`` holds this process's share of the images, and the result (metrics, loss,
    number of images) is that of all of them; ``n_examples`` of process 0's first images are kept."""
    start = _clock(device)
    quiet = None if world.is_main else True  # progress bars of process 0 only
    refiner = Refiner(cfg.crf_backend, cfg.crf_workers) if crf else None
    crf_bar = tqdm(total=2 * len(loader.sampler), desc=f"{desc} CRF", leave=False, disable=quiet if crf else True)
    with eval_mode(net, linear_probe, cluster_probe), refiner or contextlib.nullcontext(), crf_bar:
        evaluator = Evaluator(n_classes, cfg, device, refiner, n_examples, crf_bar)
        for batch in tqdm(loader, desc=desc, leave=False, disable=quiet):
            signals.check()  # a stop signal that arrived while the loader or the pool started workers
            img = batch["img"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            with autocast(device, precision):
                out = probe_outputs(net, linear_probe, cluster_probe, img, label.shape[-2:], tta, cfg.is_direct)
            evaluator.process(img, label, out)
            if label_free is not None:
                label_free.process(out.net, out.code)
        evaluator.finish()
    return evaluator.result(world, seconds=_clock(device) - start)


def _clock(device: torch.device) -> float:
    """Seconds, once the device has done the work queued so far (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def segment_code(net: nn.Module, img: Tensor, tta: bool = False) -> Tensor:
    """The network's code (B, C, h, w) of ``img`` at the patch grid, the image fed at a multiple of the patch size
    (320 px goes in as 322 for a patch of 14). ``tta``: the mean of the code of the image and the mirrored code of
    its mirror (flip test-time augmentation, as STEGO, CAUSE, EAGLE and DepthG evaluate), so the code of a
    mirrored image is exactly the mirror of the code."""
    return network_code(net, img, tta)[1]


def network_code(net: nn.Module, img: Tensor, tta: bool = False) -> tuple[NetOutput, Tensor]:
    """The network's output for ``img`` and its code as ``segment_code`` gives it."""
    img = fit_to_patches(img, net.patch_size)
    out = net(img)
    return out, (out.code + net(img.flip(-1)).code.flip(-1)) / 2 if tta else out.code


def _mapped(metric: UnsupervisedMetrics, clusters: np.ndarray) -> np.ndarray:
    return metric.map_clusters(torch.from_numpy(clusters)).numpy()


def _np(t: Tensor) -> np.ndarray:
    return t.cpu().numpy()


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """Metrics as a text table: one row per setting ("last.pth before CRF", ...), one column per metric name."""
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + "".join(f"{m:>18s}" for m in METRIC_NAMES)]
    for name, values in rows.items():
        lines.append(f"{name:<{width}s}" + "".join(f"{values.get(m, math.nan):18.2f}" for m in METRIC_NAMES))
    return "\n".join(lines)


def checkpoint_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint file (hex), read in chunks: a checkpoint of gigabytes takes little memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_report(evaluation: Evaluation, out_dir: Path, class_names: list[str], colors: np.ndarray,
                checkpoint: str | Path, prefix: str = "", tta: str = "none",
                crf_backend: str = "pydensecrf", split: str = "val") -> dict[str, Path]:
    """Write ``{prefix}eval_report.json``, the confusion matrix, the per-class IoU chart and the visualisation;
    return their paths.

    The report holds the metrics (``no_crf``, ``crf``), per-class IoU, the checkpoint, the split evaluated
    (``eval.split``; validations during training score "val") and its number of images, the test-time
    augmentation, the CRF backend (null without CRF), and the Hungarian ``matching`` of the cluster probe.
    A checkpoint file (a ``Path``) is recorded by its resolved path and its SHA-256 (``checkpoint_sha256``):
    ``predict.py`` names clusters with a report only when both are those of the checkpoint it runs. A string
    ("(training)") is recorded as it is, with no hash."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint, Path):
        recorded, sha256 = str(checkpoint.resolve()), checkpoint_sha256(checkpoint)
    else:
        recorded, sha256 = checkpoint, None
    report: dict[str, Any] = {**evaluation.metrics(),
                              "per_class_iou": evaluation.no_crf.per_class_iou(class_names),
                              "checkpoint": recorded, "checkpoint_sha256": sha256,
                              "split": split, "n_images": evaluation.n_images, "tta": tta,
                              "crf_backend": crf_backend if evaluation.crf is not None else None,
                              "seconds": {"total": round(evaluation.seconds, 3),
                                          "crf": round(evaluation.crf_seconds, 3)},
                              "matching": evaluation.matching(class_names)}
    if evaluation.crf is not None:
        report["per_class_iou_crf"] = evaluation.crf.per_class_iou(class_names)
    paths = {"report": out_dir / f"{prefix}eval_report.json",
             "confusion_matrix": out_dir / f"{prefix}confusion_matrix.png",
             "per_class_iou": out_dir / f"{prefix}per_class_iou.png"}
    write_text_atomically(paths["report"], to_json(report, indent=2) + "\n")
    plot_confusion_matrix(evaluation.no_crf.cluster, class_names, paths["confusion_matrix"])
    save_per_class_iou(report["per_class_iou"], report.get("per_class_iou_crf"), paths["per_class_iou"])
    if evaluation.examples:
        paths["visualization"] = out_dir / f"{prefix}visualization.png"
        save_segmentation_grid(paths["visualization"], evaluation.examples, class_names, colors)
    return paths


def checkpoint_path(cfg: Optional[Config], override: Optional[str]) -> Path:
    """``--checkpoint`` (a file, or a folder holding ckpt.pth), else ``{output_dir}/{checkpoint}`` likewise."""
    if override:
        path = Path(override)
    elif cfg is not None and cfg.checkpoint:
        path = Path(cfg.output_dir) / cfg.checkpoint
    else:
        raise ConfigError("no checkpoint to evaluate: pass --checkpoint FILE, or set \"checkpoint\" in the option "
                          "file (eval.py then loads {output_dir}/{checkpoint}/ckpt.pth)")
    if not path.is_dir():
        return path
    if not (path / CKPT_FILE).exists():
        found = sorted(p.name for p in path.glob("*.pth"))
        hint = (f"; it holds {', '.join(found)}: pass one with --checkpoint {path / found[-1]}" if found
                else "; pass a checkpoint file with --checkpoint")
        raise WeightsError(f"{path} holds no {CKPT_FILE} (the file name a folder stands for){hint}")
    return path / CKPT_FILE


class Reports(NamedTuple):
    metrics: dict[str, dict[str, dict[str, float]]]  # {name: {"no_crf": {metric: value}, "crf": {...}}}
    files: list[Path]  # every file written


def evaluation_set(cfg: Config) -> SegmentationDataset:
    """The split that eval.py and a run's final evaluation report on (``eval.split``) at ``eval.res``, its labels
    checked (``require_labels``). Validation during training reads "val" whatever ``eval.split`` says, so the
    checkpoints are never chosen on the split reported."""
    eval_set = build_dataset(cfg.dataset, cfg.eval.split, cfg.eval.res)
    require_labels(eval_set)
    return eval_set


def evaluate_and_report(cfg: Config, checkpoints: Mapping[str, tuple[Path, Mapping[str, Any]]], out_dir: Path,
                        fabric: Fabric, precision: str, tracker: Tracker, step: int = 0) -> Reports:
    """Evaluate loaded checkpoints on the split ``eval.split`` (``evaluation_set``: val unless the options ask for
    test) at 320 px, before and (``eval.is_crf``) after CRF.

    ``checkpoints`` maps a name (the file stem: "best", "last"; "" for eval.py's file into a folder of the user's
    choice) to (path, checkpoint). For each, ``{name}_eval_report.json`` (recording the checkpoint's resolved path
    and SHA-256), its confusion matrix and (``eval.is_visualize``) its visualisation are written into ``out_dir``
    (without the prefix for the name ""), and its metrics and pictures go to wandb under
    ``eval/{name or file stem}/``. One table of all of them is printed. With several processes, each evaluates its
    share of the images and process 0 writes, logs and prints (the others return no files).
    """
    world = World(fabric)

    def prepare() -> tuple[Any, list]:
        eval_set = evaluation_set(cfg)  # before any network: a missing split is told at once
        return eval_set, [networks_from_checkpoint(ckpt, cfg.model, eval_set.n_classes, str(path))
                         for path, ckpt in checkpoints.values()]

    eval_set, networks = world.agree(prepare)
    n_classes = eval_set.n_classes
    loader = make_loader(eval_set, cfg.dataloader, cfg.seed, fabric.device, batch_size=EVAL_BATCH_SIZE,
                         sampler=world.share(len(eval_set)))
    names, colors = class_names(cfg.dataset), color_map(cfg.dataset)
    results, rows, files, times = {}, {}, [], []
    for (name, (path, _)), modules in zip(checkpoints.items(), networks):
        net, linear, cluster = (fabric.to_device(m) for m in modules)
        ev = evaluate(net, linear, cluster, loader, fabric.device, precision, cfg.eval, n_classes, crf=cfg.eval.is_crf,
                      n_examples=cfg.eval.n_images if cfg.eval.is_visualize else 0, desc=f"evaluating {path.name}",
                      world=world, tta=cfg.eval.tta == "flip")
        results[name] = ev.metrics()
        if not world.is_main:
            continue
        paths = save_report(ev, out_dir, names, colors, checkpoint=path, prefix=f"{name}_" if name else "",
                            tta=cfg.eval.tta, crf_backend=cfg.eval.crf_backend, split=cfg.eval.split)
        files += paths.values()
        rows.update({f"{path.name} {SETTINGS[setting]}": values for setting, values in results[name].items()})
        times.append(f"{path.name}: {ev.seconds:.1f} s" + (f", of which the dense CRF ({cfg.eval.crf_backend}) "
                                                            f"{ev.crf_seconds:.1f} s" if ev.crf is not None else ""))
        section = f"eval/{name or path.stem}"
        tracker.log({f"{section}/{setting}/{k}": v for setting, values in results[name].items()
                     for k, v in values.items()}, step=step)
        tracker.log_images({f"{section}/{k}": v for k, v in paths.items() if k != "report"}, step=step)
    if world.is_main:
        print(f"{len(eval_set)} images of {cfg.dataset.data_type} {cfg.eval.split}, {cfg.dataset.data_path}")
        print(format_table(rows))
        print("evaluation time: " + "; ".join(times) + (
            " (the CRF pool's workers refine while the network runs: counted is the time spent handing them images "
            "and waiting for them)" if cfg.eval.is_crf and overlaps_network(cfg.eval.crf_backend) else ""))
    return Reports(metrics=results, files=files)


def draw_predictions(cfg: Config, path: Path, ckpt: Mapping[str, Any], out: Path, device: torch.device,
                     precision: str) -> int:
    """The cluster probe's predictions of a checkpoint on the first ``eval.n_images`` (at least one) validation
    images, as the image and its cluster map in one PNG at ``out`` (the clusters by number: without labels there is
    no matching to name them); returns the number of images drawn. For a run without labels to score."""
    val_set = build_dataset(cfg.dataset, "val", cfg.eval.res)
    n_images = min(max(cfg.eval.n_images, 1), len(val_set))
    net, linear, cluster = (m.to(device) for m in networks_from_checkpoint(ckpt, cfg.model, val_set.n_classes,
                                                                              str(path)))
    loader = make_loader(val_set, cfg.dataloader, cfg.seed, device, batch_size=EVAL_BATCH_SIZE, sampler=range(n_images))
    rows = []
    with eval_mode(net, linear, cluster), torch.inference_mode():
        for batch in loader:
            img = batch["img"].to(device)
            with autocast(device, precision):
                outputs = probe_outputs(net, linear, cluster, img, img.shape[-2:], cfg.eval.tta == "flip",
                                        cfg.eval.is_direct)
            rgb, clusters = denormalize_batch(img), outputs.cluster_inner.argmax(1)
            rows += [{"image": _np(rgb[j]), "cluster": _np(clusters[j])} for j in range(img.shape[0])]
    n_clusters = outputs.cluster_inner.shape[1]
    save_segmentation_grid(out, rows, [f"cluster {k}" for k in range(n_clusters)], pascal_color_map(n_clusters + 1)[1:])
    return n_images


def config_for_checkpoint(cfg: Optional[Config], ckpt: Mapping[str, Any], overrides: Sequence[Any],
                          path: Path) -> Config:
    """The options to evaluate ``ckpt`` with: the option file's (``cfg``), else the ones stored in the checkpoint
    with ``overrides`` applied. With both, the keys that matter for evaluation and differ are named in a warning."""
    saved = ckpt.get("config")
    if cfg is None:
        if saved is None:
            raise ConfigError(f"{path} holds no options (a released checkpoint holds only weights): pass the option "
                              f"file it was trained with, e.g. --opt json/server/cocostuff8_eval.json")
        return config_from_dict(saved, source=f"{path} (the options stored in it)", overrides=overrides)
    if saved is not None:
        differ = [k for k in config_differences(saved, config_to_dict(cfg)) if k.startswith(EVALUATION_SECTIONS)]
        if differ:
            log.warning("the options given (--opt and overrides) differ from those stored in %s in %s; evaluating "
                        "with the options given (leave out --opt to start from the stored ones)", path,
                        ", ".join(differ))
    return cfg
