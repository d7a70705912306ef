"""What a run folder holds, by name: the files that run.py, eval.py and a sweep write, the lock that makes a folder one
process's, and the metric and setting names that final_metrics.json and the reports are keyed by.

Free of torch, so that reading run folders (``python -m tools.report``, the end of a sweep) loads no model code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from utils.errors import UserError
from utils.files import FolderLock

# A training run's folder, {output_dir}/{wandb.name}/.
CONFIG_FILE = "config.json"  # the run's resolved options
DATA_FILE = "data_fingerprint.json"  # what tells the data a run reads apart (dataset.fingerprint); written as it starts
LOG_FILE = "log.jsonl"  # one JSON line per train line and per validation
CURVES_FILE = "curves.png"  # drawn from log.jsonl
LAST, BEST = "last.pth", "best.pth"
LABEL_FREE = "label_free.pth"  # chosen at the validations by train.label_free_criterion, without labels
# final_metrics.json's keys -> the checkpoint file each key scores
CHECKPOINTS = {"best": BEST, "last": LAST, "label_free": LABEL_FREE}
FINAL_METRICS = "final_metrics.json"  # written at the end of a run: a run folder without it is unfinished
VAL_FOLDER = "val"  # the latest validation's report and pictures, written for wandb
LOCK_FILE = ".lock"  # held by the process that owns the folder: a run's or a sweep's

# Evaluation reports.
EVAL_REPORT = "eval_report.json"  # eval.py --out; beside a checkpoint, {stem}_eval_report.json (REPORT_SUFFIX)
REPORT_SUFFIX = f"_{EVAL_REPORT}"
CKPT_FILE = "ckpt.pth"  # the file name the original eval.py loads from {output_dir}/{checkpoint}/

# A sweep's folder holds one run folder per combination of the swept values, and:
SWEEP_FILE = "sweep.json"  # where every run stands
CONSOLE_FILE = "console.log"  # in a run's folder: its output when several runs share the terminal (--jobs N)

# The summary of finished runs: at the end of a sweep, in its folder; python -m tools.report's, in --out.
SUMMARY_MD, SUMMARY_JSON, SUMMARY_CSV = "summary.md", "summary.json", "summary.csv"
SUMMARY_FILES = (SUMMARY_MD, SUMMARY_JSON, SUMMARY_CSV)
SUMMARY_CURVES = "summary_curves.png"

# The keys of the metrics (engine.metrics.get_metrics) and of the settings in final_metrics.json and the reports.
METRIC_NAMES = ("Cluster_mIoU", "Cluster_Accuracy", "Linear_mIoU", "Linear_Accuracy")
SETTINGS = {"no_crf": "before CRF", "crf": "after CRF"}  # result key -> how tables name it


def own_folder(folder: Path, owner: str = "run") -> FolderLock:
    """Lock ``folder`` (created if needed) for this process, which is the ``owner`` ("run" or "sweep") that writes
    into it; or raise ``UserError`` naming the process that holds it."""
    lock = FolderLock(folder / LOCK_FILE)
    if not lock.acquire():
        raise UserError(f"{folder} is in use by {lock.holder()}; wait for that {owner} to end, or choose another "
                        f"wandb.name or output_dir")
    return lock


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log.jsonl (none if there is no file); a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
