"""The training loop: PPAP trains the network; the two probes learn on the detached code, as the original.

Per iteration: the network's forward pass under autocast (Fabric); the PPAP loss on (z, feats) in fp32; the linear
probe's cross-entropy (ignoring unlabelled pixels) and the cluster probe's loss on ``code.detach()``, so labels
reach only the probes; total = PPAP + probe losses; backward; the network's gradient norm clipped at
``train.grad_norm``; one optimizer step per part; the fp16 loss scale updated once. Validation every
``train.valid_freq`` batches and at each epoch end, as the original; checkpoints after each validation.
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from dataset import build_dataset, class_names, color_map, require_labels
from engine.checkpoint import config_differences, load_networks, set_rng_state, training_checkpoint
from engine.evaluate import (EVAL_BATCH_SIZE, METRIC_NAMES, Evaluation, evaluate, format_table, make_loader,
                             save_report)
from loss import PPAPLoss, PPAPResult
from model import build_model
from utils.checkpoint import load_checkpoint, save_atomically
from utils.config import Config, OptimConfig, config_to_dict
from utils.device import load_scaler_state, make_fabric, resolve_device, resolve_precision, scaler_state, update_scale
from utils.errors import ConfigError, DataError, UserError
from utils.tracking import Tracker

log = logging.getLogger(__name__)

LAST, BEST = "last.pth", "best.pth"
CONFIG_FILE, LOG_FILE, FINAL_METRICS = "config.json", "log.jsonl", "final_metrics.json"
VAL_EXAMPLES = 4  # validation images shown in wandb at each validation
# Config keys that may change between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = ("train.epoch", "train.print_freq", "train.valid_freq", "dataloader.num_workers", "wandb.",
                     "eval.", "dataset.data_path", "output_dir", "checkpoint", "gpu_ids")


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; training stops and the last checkpoint stays as it was."""


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, from (seed, epoch) alone, that can start at any batch of the epoch.

    This is what makes resume exact: the data order of an epoch does not depend on how the run got there.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size  # the last incomplete batch is dropped, as the original

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        start, stop = self.start_batch * self.batch_size, self.batches_per_epoch() * self.batch_size
        return iter(order[start:stop].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch  # distinct streams per (seed, epoch)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizers(cfg, net: nn.Module, linear: nn.Module, cluster: nn.Module) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per part, as configured: the network (Adam or AdamW), the probes (Adam)."""

    def make(part: OptimConfig, params) -> torch.optim.Optimizer:
        params = [p for p in params if p.requires_grad]
        if part.name == "adamw":
            return torch.optim.AdamW(params, lr=part.lr, weight_decay=part.weight_decay)
        return torch.optim.Adam(params, lr=part.lr)

    return {"net": make(cfg.net, net.parameters()), "linear": make(cfg.linear, linear.parameters()),
            "cluster": make(cfg.cluster, cluster.parameters())}


def probe_cross_entropy(logits: Tensor, label: Tensor, n_classes: int) -> Tensor:
    """The linear probe's loss, as the original: logits upsampled to the label size, unlabelled pixels ignored."""
    logits = F.interpolate(logits, label.shape[-2:], mode="bilinear", align_corners=False)
    valid = (label >= 0) & (label < n_classes)
    if not bool(valid.any()):  # an unlabelled batch teaches the probe nothing (the original returned NaN)
        return logits.sum() * 0.0
    return F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], label[valid])


def forward_losses(net: nn.Module, linear: nn.Module, cluster: nn.Module, loss_fn: nn.Module, img: Tensor,
                   label: Tensor, n_classes: int) -> tuple[dict[str, Tensor], PPAPResult]:
    """The loss terms of one batch: PPAP on the network's output, the probes' losses on the detached code."""
    out = net(img)
    ppap = loss_fn(out.z, out.feats)
    code = out.code.detach()  # labels reach only the probes
    terms = {"PPAP": ppap.loss,
             "linear probe": probe_cross_entropy(linear(code), label, n_classes),
             "cluster probe": cluster(code, None).loss}
    return terms, ppap


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    iteration: int = 0
    best: float = -math.inf
    best_epoch: int = 0
    best_iter: int = 0


def train(cfg: Config, run_dir: Path, make_tracker: Callable[[Optional[str]], Tracker],
          resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir``; returns the final metrics of best.pth and last.pth.

    ``make_tracker(run_id)`` opens the wandb run (``run_id``: the run to continue on --resume, else None).
    """
    device = resolve_device(cfg.device, cfg.gpu_ids)
    precision = resolve_precision(cfg.precision, device)
    last_path, best_path = run_dir / LAST, run_dir / BEST
    if resume and not last_path.is_file():
        raise UserError(f"--resume: {last_path} not found; start without --resume to begin a new run")
    if not resume and last_path.exists():
        raise UserError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, or choose another "
                        f"wandb.name or output_dir for a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config_to_dict(cfg)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    seed_everything(cfg.seed)

    train_set, val_set = build_dataset(cfg.dataset, "train"), build_dataset(cfg.dataset, "val")
    n_classes = val_set.n_classes
    if len(train_set) < cfg.dataloader.batch_size:
        raise DataError(f"{cfg.dataset.data_path}: the training set has {len(train_set)} images, fewer than one "
                        f"batch of dataloader.batch_size={cfg.dataloader.batch_size}")
    validate = val_set.has_labels
    if not validate:
        log.warning("the validation set has no labels: training runs without validation and best.pth, "
                    "and last.pth is saved every %d iterations", cfg.train.valid_freq)
    sampler = EpochSampler(len(train_set), cfg.dataloader.batch_size, cfg.seed)
    train_loader = make_loader(train_set, cfg, device, batch_size=cfg.dataloader.batch_size, sampler=sampler,
                           drop_last=True)
    val_loader = make_loader(val_set, cfg, device, batch_size=EVAL_BATCH_SIZE)
    n_batches = sampler.batches_per_epoch()

    net, linear, cluster = build_model(cfg.model, n_classes)
    optimizers = build_optimizers(cfg.optimizer, net, linear, cluster)
    fabric = make_fabric(device, precision)
    net_f, opt_net = fabric.setup(net, optimizers["net"])
    linear_f, opt_linear = fabric.setup(linear, optimizers["linear"])
    cluster_f, opt_cluster = fabric.setup(cluster, optimizers["cluster"])
    loss_fn = PPAPLoss(cfg.training_coeff)

    progress = Progress()
    ckpt = load_checkpoint(last_path) if resume else {}
    if resume:
        changed = [k for k in config_differences(ckpt.get("config", {}), config)
                   if not any(k == allowed or k.startswith(allowed) for allowed in RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"--resume: the options differ from the run in {last_path} in {', '.join(changed)}; "
                              f"restore them or start a new run")
        load_networks(ckpt, net, linear, cluster, str(last_path))
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt[f"{name}_optimizer_state_dict"])
        load_scaler_state(fabric, ckpt["scaler_state_dict"])
        progress = Progress(epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"], iteration=ckpt["iter"],
                            best=ckpt["best"], best_epoch=ckpt["best_epoch"], best_iter=ckpt["best_iter"])
        if progress.batch_in_epoch >= n_batches:
            progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        log.info("resuming %s at epoch %d, batch %d (iteration %d)", last_path, progress.epoch,
                 progress.batch_in_epoch, progress.iteration)
    tracker = make_tracker(ckpt.get("wandb_run_id"))
    journal = Journal(run_dir / LOG_FILE, tracker)
    names, colors = class_names(cfg.dataset), color_map(cfg.dataset)

    def save(path: Path, metrics: dict[str, float]) -> None:
        save_atomically(training_checkpoint(
            net=net, linear=linear, cluster=cluster, optimizers=optimizers, scaler=scaler_state(fabric),
            epoch=progress.epoch, iteration=progress.iteration, batch_in_epoch=progress.batch_in_epoch,
            best=progress.best, best_epoch=progress.best_epoch, best_iter=progress.best_iter, metrics=metrics,
            config=config, wandb_run_id=tracker.run_id), path)

    if resume:  # last: everything above may draw random numbers (model initialisation)
        set_rng_state(ckpt["rng_state"])
    try:
        epochs = tqdm(range(progress.epoch, cfg.train.epoch), desc="epoch", initial=progress.epoch,
                      total=cfg.train.epoch, disable=None)
        for epoch in epochs:
            progress.epoch = epoch
            start_batch = progress.batch_in_epoch
            sampler.set_epoch(epoch, start_batch)
            for m in (net, linear, cluster):
                m.train()
            timer, seen = time.perf_counter(), 0
            batches = tqdm(train_loader, desc=f"epoch {epoch}", initial=start_batch, total=n_batches, leave=False,
                           disable=None)
            for i, batch in enumerate(batches, start=start_batch):
                img = batch["img"].to(device, non_blocking=True)
                label = batch["label"].to(device, non_blocking=True)
                terms, ppap = forward_losses(net_f, linear_f, cluster_f, loss_fn, img, label, n_classes)
                values = torch.stack([t.detach().float() for t in terms.values()]).tolist()
                _check_finite(terms, values, progress.iteration + 1, epoch, i, last_path)
                fabric.backward(sum(terms.values()) / cfg.train.num_accum)
                grad_norm = None
                if (i + 1) % cfg.train.num_accum == 0 or i + 1 == n_batches:
                    grad_norm = fabric.clip_gradients(net_f, opt_net, max_norm=cfg.train.grad_norm,
                                                      error_if_nonfinite=False)
                    for opt in (opt_net, opt_linear, opt_cluster):
                        opt.step()
                    update_scale(fabric)
                    for opt in (opt_net, opt_linear, opt_cluster):
                        opt.zero_grad(set_to_none=True)
                progress.iteration += 1
                progress.batch_in_epoch = i + 1
                seen += img.shape[0]

                if i % cfg.train.print_freq == 0:
                    images_per_s = seen / max(time.perf_counter() - timer, 1e-9)
                    journal.train_line(progress, epoch, values, ppap, opt_net, grad_norm, net, images_per_s)
                    timer, seen = time.perf_counter(), 0

                if (i + 1) % cfg.train.valid_freq == 0 or i + 1 == n_batches:
                    metrics: dict[str, float] = {}
                    if validate:
                        ev = evaluate(net, linear, cluster, val_loader, device, precision, cfg.eval, n_classes,
                                      n_examples=VAL_EXAMPLES if tracker.run is not None else 0, desc="validation")
                        metrics = ev.no_crf.values
                        score = sum(metrics[m] for m in METRIC_NAMES)
                        improved = score >= progress.best  # ties update, as the original's <=
                        if improved:
                            progress.best, progress.best_epoch, progress.best_iter = score, epoch, progress.iteration
                            save(best_path, metrics)
                        journal.validation(progress, epoch, ev, improved, run_dir, names, colors)
                    save(last_path, metrics)
                    timer, seen = time.perf_counter(), 0
            progress.batch_in_epoch = 0
        results = final_evaluation(cfg, run_dir, net, linear, cluster, val_loader, device, precision, n_classes,
                                   validate)
        tracker.log({f"final/{which}/{setting}/{k}": v for which, r in results.items()
                     for setting, values in r.items() for k, v in values.items()}, step=progress.iteration)
        return results
    finally:
        journal.close()
        tracker.finish()


def _check_finite(terms: dict[str, Tensor], values: list[float], iteration: int, epoch: int, batch: int,
                  last_path: Path) -> None:
    for name, value in zip(terms, values):
        if not math.isfinite(value):
            kept = f"{last_path} is the last good checkpoint" if last_path.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"iteration {iteration} (epoch {epoch}, batch {batch}): the {name} loss is {value}; "
                                   f"training stopped, {kept}")


class Journal:
    """The run's record: a concise console line, a JSON line in log.jsonl and a wandb entry per event."""

    def __init__(self, path: Path, tracker: Tracker) -> None:
        self.file = path.open("a", encoding="utf-8")
        self.tracker = tracker

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def train_line(self, progress: Progress, epoch: int, values: list[float], ppap, optimizer, grad_norm,
                   net: nn.Module, images_per_s: float) -> None:
        total, ppap_loss, linear_loss, cluster_loss = sum(values), *values
        lr = optimizer.param_groups[0]["lr"]
        gnorm = float(grad_norm) if grad_norm is not None else math.nan
        param_norm = float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.detach()) for p in net.parameters() if p.requires_grad])))
        record = {"type": "train", "epoch": epoch, "iter": progress.iteration, "loss": total, "ppap": ppap_loss,
                  "linear": linear_loss, "cluster": cluster_loss, "num_pos": float(ppap.num_pos),
                  "num_neg": float(ppap.num_neg), "lr": lr, "grad_norm": gnorm, "param_norm": param_norm,
                  "images_per_s": images_per_s}
        tqdm.write(f"iter {progress.iteration:6d} | loss {total:8.4f} | ppap {ppap_loss:8.4f} | linear "
                   f"{linear_loss:6.3f} | cluster {cluster_loss:7.4f} | pos {record['num_pos']:7.1f} | neg "
                   f"{record['num_neg']:8.1f} | lr {lr:.1e} | grad {gnorm:7.3f} | {images_per_s:6.1f} img/s",
                   file=sys.stdout)
        self._write(record)
        # the original's wandb names, so dashboards made for it keep working
        self.tracker.log({"epoch": epoch, "iters": progress.iteration, "train_loss": total, "supcon_loss": ppap_loss,
                          "linear_loss": linear_loss, "cluster_loss": cluster_loss, "net_lr": lr,
                          "param_norm": param_norm, "grad_norm": gnorm, "num_positives": record["num_pos"],
                          "num_negatives": record["num_neg"], "images_per_s": images_per_s}, step=progress.iteration)

    def validation(self, progress: Progress, epoch: int, ev: Evaluation, improved: bool, run_dir: Path,
                   names: list[str], colors: np.ndarray) -> None:
        metrics = ev.no_crf.values
        record = {"type": "val", "epoch": epoch, "iter": progress.iteration, **metrics, "valid_loss": ev.loss,
                  "best": improved}
        tqdm.write(f"[VAL] iter {progress.iteration:6d} | " + " | ".join(f"{k} {metrics[k]:.2f}" for k in METRIC_NAMES)
                   + (" | new best" if improved else ""), file=sys.stdout)
        self._write(record)
        self.tracker.log({**metrics, "iters": progress.iteration, "valid_loss": ev.loss}, step=progress.iteration)
        if self.tracker.run is not None:
            paths = save_report(ev, run_dir / "val", names, colors, checkpoint="(training)")
            self.tracker.log_images({"val_segmentation": paths["visualization"],
                                     "val_confusion_matrix": paths["confusion_matrix"]}, step=progress.iteration)

    def close(self) -> None:
        self.file.close()


def final_evaluation(cfg: Config, run_dir: Path, net, linear, cluster, val_loader: DataLoader,
                     device: torch.device, precision: str, n_classes: int, validate: bool) -> dict[str, Any]:
    """Evaluate best.pth and last.pth before and after CRF; print one table; write final_metrics.json."""
    if not validate:
        log.warning("no validation labels: skipping the final evaluation")
        return {}
    names, colors = class_names(cfg.dataset), color_map(cfg.dataset)
    results, rows = {}, {}
    for which in ("best", "last"):
        path = run_dir / f"{which}.pth"
        load_networks(load_checkpoint(path), net, linear, cluster, str(path))
        ev = evaluate(net, linear, cluster, val_loader, device, precision, cfg.eval, n_classes, crf=cfg.eval.is_crf,
                      n_examples=cfg.eval.n_images if cfg.eval.is_visualize else 0, desc=f"final eval {which}")
        save_report(ev, run_dir, names, colors, checkpoint=str(path), prefix=f"{which}_")
        results[which] = ev.metrics()
        rows[f"{which}.pth before CRF"] = ev.no_crf.values
        if ev.crf is not None:
            rows[f"{which}.pth after CRF"] = ev.crf.values
    (run_dir / FINAL_METRICS).write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(rows))
    print("best.pth is selected with validation labels; last.pth is the label-free choice.")
    return results


def evaluate_run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """run.py --test: the final evaluation of an existing run's best.pth and last.pth, without training."""
    for name in (BEST, LAST):
        if not (run_dir / name).is_file():
            raise UserError(f"--test: {run_dir / name} not found; train first (run.py without --test)")
    device = resolve_device(cfg.device, cfg.gpu_ids)
    precision = resolve_precision(cfg.precision, device)
    val_set = build_dataset(cfg.dataset, "val")
    require_labels(val_set)
    net, linear, cluster = build_model(cfg.model, val_set.n_classes, load_backbone=False)
    for module in (net, linear, cluster):
        module.to(device)
    val_loader = make_loader(val_set, cfg, device, batch_size=EVAL_BATCH_SIZE)
    return final_evaluation(cfg, run_dir, net, linear, cluster, val_loader, device, precision, val_set.n_classes,
                            validate=True)
