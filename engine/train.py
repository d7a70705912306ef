"""The training loop: PPAP trains the network; the two probes learn on the detached code.

``setup()`` builds a new run or restores one from its last.pth; ``train_one_epoch()`` runs the steps;
``validate_and_save()`` scores the validation set and writes the checkpoints; ``train()`` puts them together and
ends with the final evaluation of best.pth and last.pth. The step is written out in ``train_one_epoch()``, where it
happens, so that it reads top to bottom; the README's Training section says what it computes.

Every function runs on every process of a data-parallel run (``torchrun``, ``srun``; README: "Many GPUs and many
machines"), each on its part of the global batch. Process 0 owns the run directory: it writes the checkpoints, the
log and the reports, prints and logs to wandb; the others wait for its checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np
import torch
from lightning_fabric import Fabric
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import EpochSampler, SeededSamples, build_dataset, class_names, color_map, fingerprint, make_loader
from engine.checkpoint import (config_differences, load_checkpoint, load_networks, require_training_state,
                               set_rng_state, training_checkpoint)
from engine.criteria import LabelFree, better
from engine.evaluate import EVAL_BATCH_SIZE, draw_predictions, evaluate, evaluate_and_report
from engine.journal import LABELS, Journal, trim_log
from engine.self_training import SelfTraining, start_self_training
from engine.rundir import (BEST, CHECKPOINTS, CONFIG_FILE, CURVES_FILE, DATA_FILE, FINAL_METRICS, LABEL_FREE, LAST,
                           LOG_FILE, METRIC_NAMES, own_folder)
from loss import PPAPLoss, PPAPResult, probe_cross_entropy
from model import build_model, dropout_mask
from config import FORMER_DEFAULTS, NO_EFFECT, Config, OptimConfig, OptimizerConfig, config_from_dict, config_to_dict, option_keys
from utils.device import AUTOCAST_DTYPES, autocast, grad_scaler, resolve_precision
from utils.distributed import ONE_PROCESS, World
from utils.errors import ConfigError, DataError, UserError
from utils.files import FolderLock, remove_temporaries, save_atomically, to_json, write_text_atomically
from utils import signals
from engine.tracking import Tracker

log = logging.getLogger(__name__)

VAL_EXAMPLES = 4  # validation images shown in wandb at each validation
ITERATION_STREAM = 1  # tells the random stream of the iterations apart from others derived from the seed
# A resumed run keeps the steps it has taken, so besides the options that change no computation it may run for more
# epochs, validate and save at other iterations, evaluate otherwise (the eval options change validations and the final
# evaluation, never a training step) and switch deterministic kernels (the same arithmetic, other rounding).
RESUMED_RUN_MAY_CHANGE = ("train.epoch", "train.valid_freq", "eval.", "deterministic")
# Config keys that may change between a run and its --resume without changing what is computed.
RESUMABLE_CHANGES = option_keys(NO_EFFECT) + RESUMED_RUN_MAY_CHANGE


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; training stops and the last checkpoint stays as it was."""


class LossTerms(NamedTuple):
    """The three losses of one batch; their sum is what is backpropagated."""

    ppap: Tensor  # the PPAP loss of the network
    linear: Tensor  # the linear probe's cross-entropy on the labels
    cluster: Tensor  # the cluster probe's loss; in a second stage, the student's cross-entropy on the teacher's maps

    @property
    def total(self) -> Tensor:
        return self.ppap + self.linear + self.cluster


class Optimizers(NamedTuple):
    """One optimizer per part, each with its own learning rate (and, for the network, optimizer and decay)."""

    net: torch.optim.Optimizer
    linear: torch.optim.Optimizer
    cluster: torch.optim.Optimizer


@dataclass
class Progress:
    """Where training stands; saved whole in every checkpoint, under the released checkpoints' key names."""

    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already trained on
    iteration: int = 0
    best: float = -math.inf  # the best validation score so far (sum of the four metrics)
    best_epoch: int = 0
    best_iter: int = 0
    label_free: float = math.nan  # the best value so far of train.label_free_criterion (NaN: none yet)
    label_free_epoch: int = 0
    label_free_iter: int = 0  # 0: no label_free.pth written yet

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "iter": self.iteration, "batch_in_epoch": self.batch_in_epoch,
                "best": self.best, "best_epoch": self.best_epoch, "best_iter": self.best_iter,
                "label_free_best": self.label_free, "label_free_epoch": self.label_free_epoch,
                "label_free_iter": self.label_free_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.iteration, self.batch_in_epoch = state["epoch"], state["iter"], state["batch_in_epoch"]
        self.best, self.best_epoch, self.best_iter = state["best"], state["best_epoch"], state["best_iter"]
        # checkpoints written before label_free.pth existed: none chosen yet
        self.label_free = state.get("label_free_best", math.nan)
        self.label_free_epoch, self.label_free_iter = state.get("label_free_epoch", 0), state.get("label_free_iter", 0)

    def label_free_choice(self, criterion: str) -> dict[str, Any]:
        """What label_free.pth records of its choice; in the released keys too ("best" is then the criterion's value),
        so that the file holds nothing a label decided."""
        return {"best": self.label_free, "best_epoch": self.label_free_epoch, "best_iter": self.label_free_iter,
                "label_free": {"criterion": criterion, "value": self.label_free, "epoch": self.label_free_epoch,
                               "iter": self.label_free_iter}}


@dataclass
class Run:
    """Everything a training run works with, as ``setup()`` builds it. The modules are set up by Fabric (on the
    device; with several processes, in DDP); ``module.module`` is the plain module, and the state dicts are those
    of the plain modules."""

    cfg: Config
    run_dir: Path
    lock: Optional[FolderLock]  # process 0 owns run_dir while it holds the lock; None on the other processes
    fabric: Fabric
    world: World
    precision: str  # fp32 | fp16 | bf16, resolved
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    net: nn.Module
    linear: nn.Module
    cluster: nn.Module
    optimizers: Optimizers
    loss_fn: PPAPLoss
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    n_classes: int
    labelled: bool  # the validation set has labelled pixels to score (else validations compute only the label-free
    # criteria)
    wandb_run_id: Optional[str] = None  # the wandb run to continue (resume)
    progress: Progress = field(default_factory=Progress)
    self_training: Optional[SelfTraining] = None  # a second stage's teacher (self_training.checkpoint)
    clusters: Optional[Tensor] = None  # this process's cluster assignments at the last validation (for its stability)
    data_fingerprint: dict[str, Any] = field(default_factory=dict)  # of the splits it reads, for tools.report


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizers(cfg: OptimizerConfig, net: nn.Module, linear: nn.Module, cluster: nn.Module) -> Optimizers:
    """One optimizer per part, as configured: the network (Adam or AdamW), the probes (Adam)."""

    def make(part: OptimConfig, module: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        if part.name == "adamw":
            return torch.optim.AdamW(params, lr=part.lr, weight_decay=part.weight_decay)
        return torch.optim.Adam(params, lr=part.lr)

    return Optimizers(net=make(cfg.net, net), linear=make(cfg.linear, linear), cluster=make(cfg.cluster, cluster))


def iteration_stream(seed: int, iteration: int) -> torch.Generator:
    """The random stream of one training iteration, from (seed, iteration) alone: the same on every process and
    after a resume. The feature-dropout masks and the anchors of the global batch are drawn from it."""
    state = np.random.SeedSequence([seed, ITERATION_STREAM, iteration]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def forward_losses(net: nn.Module, linear: nn.Module, cluster: nn.Module, loss_fn: nn.Module, img: Tensor,
                   label: Tensor, n_classes: int, world: World = ONE_PROCESS,
                   stream: Optional[torch.Generator] = None, dropout_channels: int = 0,
                   self_training: Optional[SelfTraining] = None) -> tuple[LossTerms, Optional[PPAPResult]]:
    """The loss terms of one batch: PPAP on the network's output, the probes' losses on the detached code; in a second
    stage (``self_training``), the student's cross-entropy on the teacher's maps instead of the cluster probe's loss,
    and PPAP times ``self_training.ppap_weight`` (not computed at 0: the PPAPResult is then None).

    With ``stream`` (``iteration_stream()``), the feature-dropout masks of the ``dropout_channels`` channels
    (0: the network drops none) and the anchors are drawn from it for the global batch, and this process takes
    the rows of its images; without it, from torch's global streams. Each term is this process's part of the
    global batch's loss."""
    mask = None
    if stream is not None and dropout_channels:
        n = img.shape[0]
        mask = dropout_mask(n * world.size, dropout_channels, stream)[world.rank * n:(world.rank + 1) * n]
        mask = mask.to(img.device)
    out = net(img if self_training is None else self_training.student_input(img, stream, world), dropout_mask=mask)
    code = out.code.detach()  # labels reach only the probes
    linear_loss = probe_cross_entropy(linear(code), label, n_classes, world)
    if self_training is None:
        ppap = loss_fn(out.z, out.feats, world=world, generator=stream)
        # the cluster probe's loss is a mean over the pixels, and every process has as many
        return LossTerms(ppap=ppap.loss, linear=linear_loss, cluster=cluster(code).loss / world.size), ppap
    weight = self_training.cfg.ppap_weight
    ppap = loss_fn(out.z, out.feats, world=world, generator=stream) if weight else None
    student = self_training.loss(_plain(net), out, img, cluster, world)
    return LossTerms(ppap=ppap.loss * weight if ppap is not None else student.new_zeros(()), linear=linear_loss,
                     cluster=student), ppap


def _plain(module: nn.Module) -> nn.Module:
    """The module itself, also where Fabric or DDP wraps it."""
    return getattr(module, "module", module)


def claim_run_dir(run_dir: Path, world: World) -> Optional[FolderLock]:
    """Process 0 locks ``run_dir``; every process raises the error if it cannot."""
    return world.agree(lambda: own_folder(run_dir, "run") if world.is_main else None)


def setup(cfg: Config, run_dir: Path, fabric: Fabric, resume: bool = False) -> Run:
    """Build the run: data, model, optimizers (``fabric``: this process's device, and DDP with several processes);
    on ``resume``, restore all of it from last.pth.

    The run owns ``run_dir`` from the start (a lock of process 0 that ends with the process); nothing in the folder
    changes before the run is known to start: options checked, checkpoint readable, on every process. A user
    error that any process finds ends all of them with it."""
    world = World(fabric)
    lock = claim_run_dir(run_dir, world)
    try:
        run = world.agree(lambda: _prepare(cfg, run_dir, resume, fabric, world, lock))
        # DDP (several processes): the processes' parameters start equal, and gradients are averaged
        run.net, run.linear, run.cluster = (fabric.setup_module(m) for m in (run.net, run.linear, run.cluster))
        world.agree(lambda: _start_writing(run) if world.is_main else None)
        return run
    except BaseException:
        if lock is not None:
            lock.release(undo=not resume)  # a refused new run leaves nothing behind, not even its folder
        raise


def _prepare(cfg: Config, run_dir: Path, resume: bool, fabric: Fabric, world: World,
             lock: Optional[FolderLock]) -> Run:
    """Everything of ``setup`` that each process does alone (no collectives: another may have failed)."""
    last_path = run_dir / LAST
    if resume and not last_path.is_file():
        raise UserError(f"--resume: {last_path} not found; start without --resume to begin a new run")
    if not resume and last_path.exists():
        raise UserError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, or choose another "
                        f"wandb.name or output_dir for a new one")
    if cfg.dataloader.batch_size % world.size:
        raise ConfigError(f"dataloader.batch_size ({cfg.dataloader.batch_size}) is the global batch and must be a "
                          f"multiple of the {world.size} processes, each of which takes an equal part of it")
    ckpt = load_checkpoint(last_path) if resume else None
    if ckpt is not None:
        require_training_state(ckpt, str(last_path))
        saved = _with_defaults(ckpt["config"], str(last_path))
        cfg = _keep_former_defaults(cfg, saved, world)
        changed = [k for k in config_differences(saved, config_to_dict(cfg))
                   if not any(k == allowed or k.startswith(allowed) for allowed in RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"--resume: the options differ from the run in {last_path} in {', '.join(changed)}; "
                              f"restore them or start a new run")
    device = fabric.device
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)

    train_set, val_set = build_dataset(cfg.dataset, "train"), build_dataset(cfg.dataset, "val", cfg.eval.res)
    if len(train_set) < cfg.dataloader.batch_size:
        raise DataError(f"{cfg.dataset.data_path}: the training set has {len(train_set)} images, fewer than one "
                        f"batch of dataloader.batch_size={cfg.dataloader.batch_size}")
    labelled = val_set.has_labels and val_set.has_labelled_pixels()
    if not labelled and world.is_main:
        why = "has no labels" if not val_set.has_labels else "labels every pixel as ignored"
        log.warning("the validation set %s: its validations compute only the label-free criteria, and the run writes "
                    "label_free.pth and last.pth, without best.pth and final metrics", why)
    sampler = EpochSampler(len(train_set), cfg.dataloader.batch_size, cfg.seed, world.rank, world.size)
    second_stage = cfg.self_training.checkpoint is not None  # its weights come from a checkpoint, the backbone too
    net, linear, cluster = build_model(cfg.model, val_set.n_classes, load_backbone=not second_stage)
    self_training = start_self_training(cfg.self_training, net, linear, cluster, cfg.model, val_set.n_classes,
                                        cfg.eval.is_direct, resumed=ckpt)
    if self_training is not None:
        fabric.to_device(self_training.teacher)
        if not cfg.self_training.ppap_weight:  # the projection head feeds the PPAP loss only
            net.project_head.requires_grad_(False)
    net, linear, cluster = (fabric.to_device(m) for m in (net, linear, cluster))
    run = Run(cfg=cfg, run_dir=run_dir, lock=lock, fabric=fabric, world=world, precision=precision,
              scaler=grad_scaler(device, precision),
              net=net, linear=linear, cluster=cluster, optimizers=build_optimizers(cfg.optimizer, net, linear, cluster),
              loss_fn=PPAPLoss(cfg.training_coeff, feats_dtype=AUTOCAST_DTYPES.get(cfg.train.gather_feats)),
              sampler=sampler,
              train_loader=make_loader(SeededSamples(train_set), cfg.dataloader, cfg.seed, device,
                                       batch_size=sampler.local_batch_size, sampler=sampler),
              val_loader=make_loader(val_set, cfg.dataloader, cfg.seed, device, batch_size=EVAL_BATCH_SIZE,
                                     sampler=world.share(len(val_set))),
              n_classes=val_set.n_classes, labelled=labelled, self_training=self_training,
              data_fingerprint=fingerprint({"train": train_set, "val": val_set}, cfg.dataset.data_path))
    if ckpt is not None:
        _restore(run, ckpt, last_path)
    return run


def _with_defaults(saved: dict[str, Any], source: str) -> dict[str, Any]:
    """A checkpoint's options with the defaults of the options added since it was written (a run of an earlier
    version resumes unless an option it had changed); as they are where they no longer load."""
    try:
        return config_to_dict(config_from_dict(saved, source=source))
    except ConfigError:
        return saved


def _keep_former_defaults(cfg: Config, saved: dict[str, Any], world: World) -> Config:
    """``cfg`` with the value a resumed run was started with for each option whose default has changed since, where
    the run had the former default and ``cfg`` has today's (what an option file that does not name it gets)."""
    for (section, key), former in FORMER_DEFAULTS.items():
        started, now = saved.get(section, {}).get(key), getattr(getattr(cfg, section), key)
        if started in former and now == getattr(type(getattr(cfg, section))(), key) and started != now:
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{key: started})})
            if world.is_main:
                log.info("--resume: %s.%s stays %r, as the run was started (the default is now %r)", section, key,
                         started, now)
    return cfg


def _restore(run: Run, ckpt: dict[str, Any], path: Path) -> None:
    """Put a freshly built run where its checkpoint ``path`` left it: weights, optimizers, loss scale, progress,
    wandb run and random streams."""
    load_networks(ckpt, run.net, run.linear, run.cluster, str(path))
    for name, optimizer in run.optimizers._asdict().items():
        optimizer.load_state_dict(ckpt[f"{name}_optimizer_state_dict"])
    if ckpt.get("scaler_state_dict"):  # empty (or None) without fp16
        run.scaler.load_state_dict(ckpt["scaler_state_dict"])
    run.progress.load_state_dict(ckpt)
    if run.progress.batch_in_epoch >= run.sampler.batches_per_epoch():  # saved at the end of an epoch
        run.progress.epoch, run.progress.batch_in_epoch = run.progress.epoch + 1, 0
    run.wandb_run_id = ckpt["wandb_run_id"]
    set_rng_state(ckpt["rng_state"])  # last: building the model draws random numbers
    if run.world.is_main:
        log.info("resuming %s at epoch %d, batch %d (iteration %d)", path, run.progress.epoch,
                 run.progress.batch_in_epoch, run.progress.iteration)


def _start_writing(run: Run) -> None:
    """Process 0, once every process is ready: tidy the run directory and write the run's options."""
    for path in remove_temporaries(run.run_dir):  # left by a killed earlier run of this folder
        log.info("removed %s, an unfinished checkpoint of an interrupted run", path)
    # the log goes on from the checkpoint (a new run: from nothing, dropping what a run that saved nothing logged)
    trim_log(run.run_dir / LOG_FILE, run.progress.iteration)
    write_text_atomically(run.run_dir / CONFIG_FILE, to_json(config_to_dict(run.cfg), indent=2) + "\n")
    write_text_atomically(run.run_dir / DATA_FILE, to_json(run.data_fingerprint, indent=2) + "\n")


def train(cfg: Config, run_dir: Path, fabric: Fabric, make_tracker: Callable[[Optional[str]], Tracker],
          resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg`` into ``run_dir`` on ``fabric`` (``utils.distributed.launch``); returns the final metrics
    of best.pth and last.pth.

    ``make_tracker(run_id)`` opens the wandb run (``run_id``: the run to continue on --resume, else None); it is
    called on process 0 only.
    """
    run = setup(cfg, run_dir, fabric, resume)
    world = run.world
    if world.size > 1 and world.is_main:
        print(f"data-parallel training on {world.size} processes ({fabric.device.type}): global batch "
              f"{cfg.dataloader.batch_size} = {world.size} x {cfg.dataloader.batch_size // world.size} images")
    try:
        tracker = (make_tracker(run.wandb_run_id) if world.is_main
                   else Tracker(cfg.wandb, run_dir, {}, default_tag="", mode="disabled"))
    except BaseException:
        _release(run)
        raise
    journal = Journal(run_dir / LOG_FILE if world.is_main else None, tracker)
    try:
        with run.self_training or contextlib.nullcontext():  # a second stage's CRF pool, closed before evaluating
            for epoch in tqdm(range(run.progress.epoch, cfg.train.epoch), desc="epoch", initial=run.progress.epoch,
                              total=cfg.train.epoch, disable=None if world.is_main else True):
                train_one_epoch(run, epoch, journal)
        journal.draw_curves(run_dir / CURVES_FILE, now=True)  # the whole run, however recently it was drawn
        if not run.labelled:
            _draw_label_free(run)
            return {}
        return final_evaluation(cfg, run_dir, run.fabric, run.precision, tracker, step=run.progress.iteration)
    finally:
        journal.close()
        tracker.finish()
        _release(run)


def _draw_label_free(run: Run) -> None:
    """The end of a run without labels to score: the label-free choice's predictions, drawn by process 0."""
    if run.world.is_main:
        path, out = run.run_dir / LABEL_FREE, run.run_dir / f"{Path(LABEL_FREE).stem}_visualization.png"
        n = draw_predictions(run.cfg, path, load_checkpoint(path), out, run.fabric.device, run.precision)
        print(f"the validation set has no labels to score: no final metrics; wrote {out} (the cluster predictions of "
              f"{LABEL_FREE} on {n} validation images)")
    run.world.barrier()


def _release(run: Run) -> None:
    if run.lock is not None:
        run.lock.release()


def train_one_epoch(run: Run, epoch: int, journal: Journal) -> None:
    """Train on the batches of ``epoch`` not trained on yet; validate and save every ``train.valid_freq`` batches
    and at the end of the epoch."""
    cfg, progress, device, world = run.cfg.train, run.progress, run.fabric.device, run.world
    dropout_channels = run.net.module.model.embed_dim if run.net.module.drops_features else 0
    start = progress.batch_in_epoch if progress.epoch == epoch else 0
    progress.epoch, progress.batch_in_epoch = epoch, start
    run.sampler.set_epoch(epoch, start)
    n_batches = run.sampler.batches_per_epoch()
    for module in (run.net, run.linear, run.cluster):
        module.train()
    if run.self_training is not None and start == 0:
        run.self_training.start_epoch(run.net.module, run.cluster.module)
    timer, seen = time.perf_counter(), 0
    batches = tqdm(run.train_loader, desc=f"epoch {epoch}", initial=start, total=n_batches, leave=False,
                   disable=None if world.is_main else True)
    for i, batch in enumerate(batches, start=start):
        signals.check()  # a stop signal that arrived while the loader started its workers
        img = batch["img"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with autocast(device, run.precision):
            terms, ppap = forward_losses(run.net, run.linear, run.cluster, run.loss_fn, img, label, run.n_classes,
                                         world, iteration_stream(run.cfg.seed, progress.iteration), dropout_channels,
                                         run.self_training)
        # the losses of the global batch: the same on every process, so all of them stop together if one is not finite
        values = dict(zip(LossTerms._fields, world.sum(torch.stack([t.detach().float() for t in terms])).tolist()))
        _check_finite(values, progress.iteration + 1, epoch, i, run.run_dir / LAST)

        # fp16: the loss times the loss scale. Several processes: DDP divides the sum of their gradients by their
        # number, and the sum of the parts' gradients is the global batch's gradient: multiply by the number first
        run.scaler.scale(terms.total * world.size / cfg.num_accum).backward()
        grad_norm = math.nan  # no step in this iteration (gradient accumulation)
        if (i + 1) % cfg.num_accum == 0 or i + 1 == n_batches:
            run.scaler.unscale_(run.optimizers.net)  # fp16: the network's true gradients, to clip them
            grad_norm = float(torch.nn.utils.clip_grad_norm_(run.net.parameters(), cfg.grad_norm))
            for optimizer in run.optimizers:  # fp16: an optimizer whose gradients are not finite skips its step
                run.scaler.step(optimizer)
            run.scaler.update()  # once per iteration, after all three optimizers
            for optimizer in run.optimizers:
                optimizer.zero_grad(set_to_none=True)
            if run.self_training is not None:
                run.self_training.after_step(run.net.module, run.cluster.module)
        progress.iteration += 1
        progress.batch_in_epoch = i + 1
        seen += img.shape[0] * world.size

        if i % cfg.print_freq == 0:
            journal.train_line({
                "epoch": epoch, "iter": progress.iteration, "loss": sum(values.values()), **values,
                "num_pos": float(ppap.num_pos) if ppap is not None else math.nan,
                "num_neg": float(ppap.num_neg) if ppap is not None else math.nan,
                **({"pseudo_kept": run.self_training.kept} if run.self_training is not None else {}),
                "lr": run.optimizers.net.param_groups[0]["lr"], "grad_norm": grad_norm,
                "param_norm": _param_norm(run.net), "images_per_s": seen / max(time.perf_counter() - timer, 1e-9)})
            timer, seen = time.perf_counter(), 0
        if (i + 1) % cfg.valid_freq == 0 or i + 1 == n_batches:
            validate_and_save(run, journal)
            timer, seen = time.perf_counter(), 0


def _check_finite(values: dict[str, float], iteration: int, epoch: int, batch: int, last_path: Path) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            kept = f"{last_path} is the last good checkpoint" if last_path.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(f"iteration {iteration} (epoch {epoch}, batch {batch}): the {LABELS[name]} loss "
                                   f"is {value}; training stopped, {kept}")


def _param_norm(module: nn.Module) -> float:
    return float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.detach()) for p in module.parameters() if p.requires_grad])))


def validate_and_save(run: Run, journal: Journal) -> None:
    """Score the validation set (no CRF; each process its share) and compute the label-free criteria; write best.pth
    when the labelled score improved, label_free.pth when ``train.label_free_criterion`` did, and always last.pth
    (process 0, while the others wait)."""
    progress = run.progress
    label_free = LabelFree(run.cluster.module, run.loss_fn, run.cfg.eval.is_direct, run.clusters,
                           run.net.module.model.embed_dim, run.fabric.device)
    ev = evaluate(run.net.module, run.linear.module, run.cluster.module, run.val_loader, run.fabric.device,
                  run.precision, run.cfg.eval, run.n_classes,
                  n_examples=VAL_EXAMPLES if journal.tracker.run is not None and run.labelled else 0,
                  desc="validation", world=run.world, label_free=label_free)
    criteria, run.clusters = label_free.result(run.world), label_free.assignments
    score = sum(ev.no_crf.values[m] for m in METRIC_NAMES)  # the original's model-selection criterion (NaN unlabelled)
    improved = score >= progress.best  # a tie keeps the later weights: best.pth is chosen as the original chose it
    if improved:
        progress.best, progress.best_epoch, progress.best_iter = score, progress.epoch, progress.iteration
    chosen = _choose_label_free(progress, criteria, run.cfg.train.label_free_criterion)
    journal.validation(progress.epoch, progress.iteration, ev if run.labelled else None, improved, run.run_dir,
                       class_names(run.cfg.dataset), color_map(run.cfg.dataset), criteria, chosen)
    if run.world.is_main:
        with signals.deferred():  # the checkpoints together: an interrupt never leaves one without the others
            if improved:
                _save(run, run.run_dir / BEST, journal.tracker)
            if chosen:
                _save(run, run.run_dir / LABEL_FREE, journal.tracker,
                      progress.label_free_choice(run.cfg.train.label_free_criterion))
            _save(run, run.run_dir / LAST, journal.tracker)
        journal.draw_curves(run.run_dir / CURVES_FILE)
    run.world.barrier()  # the checkpoints are complete before any process goes on


def _choose_label_free(progress: Progress, criteria: dict[str, float], criterion: str) -> bool:
    """Whether this validation's weights become label_free.pth: the first validation's always (so that a run has one
    from its first validation on, even where the criterion is not defined yet), then those of the best value."""
    value = criteria[criterion]
    if progress.label_free_iter and not better(value, progress.label_free, criterion):
        return False
    progress.label_free, progress.label_free_epoch, progress.label_free_iter = value, progress.epoch, progress.iteration
    return True


def _save(run: Run, path: Path, tracker: Tracker, choice: Optional[dict[str, Any]] = None) -> None:
    """A training checkpoint of the run at ``path``; ``choice``: what replaces the progress's keys in it."""
    ckpt = training_checkpoint(run.net, run.linear, run.cluster, run.optimizers._asdict(), run.scaler.state_dict(),
                               run.progress.state_dict(), config_to_dict(run.cfg), tracker.run_id)
    stage = run.self_training.checkpoint_entries() if run.self_training is not None else {}
    save_atomically({**ckpt, **stage, **(choice or {})}, path)


def final_evaluation(cfg: Config, run_dir: Path, fabric: Fabric, precision: str, tracker: Tracker,
                     step: int = 0) -> dict[str, Any]:
    """Evaluate the run's best.pth, last.pth and label_free.pth before and after CRF; print one table; write
    final_metrics.json (process 0; every process evaluates its share of the images). A run folder of an earlier
    version without label_free.pth is evaluated without it."""
    world = World(fabric)

    def load() -> dict[str, tuple[Path, dict[str, Any]]]:
        checkpoints = {}
        for name, file in CHECKPOINTS.items():
            path = run_dir / file
            if file == LABEL_FREE and not path.exists():
                continue
            if not path.is_file():
                raise UserError(f"{path} not found; train first (run.py without --test)")
            checkpoints[name] = (path, load_checkpoint(path))
        return checkpoints

    checkpoints = world.agree(load)
    results = evaluate_and_report(cfg, checkpoints, run_dir, fabric, precision, tracker, step=step).metrics
    if world.is_main:
        write_text_atomically(run_dir / FINAL_METRICS, to_json(results, indent=2) + "\n")
        print(f"{BEST} is chosen with validation labels; {_label_free_line(checkpoints)}{LAST} is the last.")
    return results


def _label_free_line(checkpoints: dict[str, tuple[Path, dict[str, Any]]]) -> str:
    if "label_free" not in checkpoints:
        return f"this run has no {LABEL_FREE} (written by later versions); "
    choice = checkpoints["label_free"][1].get("label_free", {})
    return (f"{LABEL_FREE} without labels, by {choice.get('criterion')} ({choice.get('value', math.nan):.4g} at "
            f"iteration {choice.get('iter')}); ")


def evaluate_run(cfg: Config, run_dir: Path, fabric: Fabric, tracker: Tracker) -> dict[str, Any]:
    """run.py --test: the final evaluation of an existing run's best.pth and last.pth, without training."""
    world = World(fabric)

    def claim() -> Optional[FolderLock]:
        if not run_dir.is_dir():
            raise UserError(f"--test: {run_dir} not found; train first (run.py without --test)")
        return own_folder(run_dir, "run") if world.is_main else None

    lock = world.agree(claim)
    try:
        return final_evaluation(cfg, run_dir, fabric, resolve_precision(cfg.precision, fabric.device), tracker)
    finally:
        if lock is not None:
            lock.release()
