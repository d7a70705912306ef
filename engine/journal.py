"""The run's record: for every train line and validation, a console line, a JSON line in log.jsonl and a wandb entry;
and curves.png, drawn from log.jsonl.

``TRAIN_FIELDS`` is the one table of what a train line holds and what each quantity is called where: its key in
log.jsonl (the name the code uses), its wandb name and its console format.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
from tqdm import tqdm

from engine.evaluate import Evaluation, save_report
from engine.rundir import METRIC_NAMES, VAL_FOLDER, read_log
from utils.errors import OutputError
from utils.files import to_json, write_text_atomically
from engine.tracking import Tracker
from engine.plots import save_curves


class Field(NamedTuple):
    key: str  # in log.jsonl and in the code
    wandb: str  # the original's wandb name, so that dashboards made for it keep working
    console: Optional[str]  # format of its part of the console line; None: not shown there
    label: str  # how messages name it


TRAIN_FIELDS = (
    Field("epoch", "epoch", None, "epoch"),
    Field("iter", "iters", "iter {:6d}", "iteration"),
    Field("loss", "train_loss", "loss {:8.4f}", "total"),
    Field("ppap", "supcon_loss", "ppap {:8.4f}", "PPAP"),
    Field("linear", "linear_loss", "linear {:6.3f}", "linear probe"),
    Field("cluster", "cluster_loss", "cluster {:7.4f}", "cluster probe"),
    Field("num_pos", "num_positives", "pos {:7.1f}", "positives per anchor"),
    Field("num_neg", "num_negatives", "neg {:8.1f}", "confident negatives per anchor"),
    Field("lr", "net_lr", "lr {:.1e}", "network learning rate"),
    Field("grad_norm", "grad_norm", "grad {:7.3f}", "network gradient norm before clipping"),
    Field("param_norm", "param_norm", None, "norm of the trained network parameters"),
    Field("images_per_s", "images_per_s", "{:6.1f} img/s", "images per second"),
    Field("pseudo_kept", "pseudo_kept", "kept {:5.3f}", "fraction of pixels with a pseudo-label (second stage)"),
)
OPTIONAL_FIELDS = ("pseudo_kept",)  # in the train lines of a second stage only
LABELS = {f.key: f.label for f in TRAIN_FIELDS}
# curves.png is redrawn at a validation once this long has passed since it was last drawn (drawing takes most of a
# second; validations can come every few seconds), and at the end of training
CURVES_EVERY_S = 30.0


class Journal:
    """Writes the run's events to the console, ``log.jsonl`` (appended to on resume) and wandb; with ``path`` None
    (the data-parallel processes other than process 0), nothing."""

    def __init__(self, path: Optional[Path], tracker: Tracker) -> None:
        self.path = path
        self.file = path.open("a", encoding="utf-8") if path is not None else None
        self.tracker = tracker
        self._curves_drawn = time.monotonic()  # when curves.png was last drawn (the run's start, at first)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(to_json(record) + "\n")
            self.file.flush()
        except OSError as err:  # a full disk: name the file (the error of a write on an open file does not)
            raise OutputError(f"cannot write {self.path}: {err.strerror or err}") from None

    def train_line(self, stats: Mapping[str, float]) -> None:
        """``stats``: a value for every key of ``TRAIN_FIELDS`` but the ``OPTIONAL_FIELDS``."""
        if self.file is None:
            return
        fields = [f for f in TRAIN_FIELDS if f.key not in OPTIONAL_FIELDS or f.key in stats]
        tqdm.write(" | ".join(f.console.format(stats[f.key]) for f in fields if f.console), file=sys.stdout)
        self._write({"type": "train", **{f.key: stats[f.key] for f in fields}})
        self.tracker.log({f.wandb: stats[f.key] for f in fields}, step=int(stats["iter"]))

    def validation(self, epoch: int, iteration: int, ev: Optional[Evaluation], improved: bool, run_dir: Path,
                   names: list[str], colors: np.ndarray, criteria: Mapping[str, float], chosen: bool) -> None:
        """One validation: its labelled scores (``ev``; None without labels), whether best.pth was written
        (``improved``), the label-free ``criteria`` and whether label_free.pth was written (``chosen``)."""
        if self.file is None:
            return
        metrics = ev.no_crf.values if ev is not None else {}
        scores = " | ".join(f"{k} {metrics[k]:.2f}" for k in METRIC_NAMES) if metrics else "no labels"
        tqdm.write(f"[VAL] iter {iteration:6d} | {scores}" + (" | new best" if improved else "") + " | label-free: "
                   + ", ".join(f"{k} {v:.4g}" for k, v in criteria.items()) + (" | new label-free" if chosen else ""),
                   file=sys.stdout)
        record = {**metrics, "valid_loss": ev.loss} if ev is not None else {}
        self._write({"type": "val", "epoch": epoch, "iter": iteration, **record, "best": improved, **criteria,
                     "label_free": chosen})
        self.tracker.log({**record, "iters": iteration, **{f"label_free/{k}": v for k, v in criteria.items()}},
                         step=iteration)
        if self.tracker.run is not None and ev is not None:
            paths = save_report(ev, run_dir / VAL_FOLDER, names, colors, checkpoint="(training)")
            self.tracker.log_images({"val_segmentation": paths["visualization"],
                                     "val_confusion_matrix": paths["confusion_matrix"]}, step=iteration)

    def draw_curves(self, path: Path, now: bool = False) -> None:
        """``curves.png`` from everything log.jsonl holds so far (the run's pictures without wandb): when ``now``,
        else if CURVES_EVERY_S have passed since it was last drawn (or the run started)."""
        if self.file is None or not (now or time.monotonic() - self._curves_drawn >= CURVES_EVERY_S):
            return
        save_curves(read_log(self.path), path)
        self._curves_drawn = time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def trim_log(path: Path, iteration: int) -> None:
    """Keep the records of ``path`` up to ``iteration`` (a resumed run goes on from its checkpoint's iteration);
    a line cut short by a kill is dropped too. The file is replaced in one rename."""
    if not path.is_file():
        return
    kept = [to_json(record) + "\n" for record in read_log(path) if record.get("iter", 0) <= iteration]
    write_text_atomically(path, "".join(kept))
