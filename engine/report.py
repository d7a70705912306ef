"""The final metrics of many runs in one table, grouped by everything but the seed, with mean +- standard deviation
and min-max per group (``python -m tools.report`` and the end of a sweep).

Runs are grouped by their options with the seed and the options that do not change what is computed left out (paths,
wandb, printing, workers, the evaluation's worker count), and by their data: the fingerprint a run records when it
starts (``data_fingerprint.json``: per split, the number of images and a hash of the file names below
``dataset.data_path``), so that runs on different data never share a group and runs on the same data moved elsewhere
do. A run folder written before the fingerprint existed is grouped by its ``dataset.data_path``, apart from the runs
that have one. A group is named by the options in which the groups differ ("data=" a short hash of the fingerprint).
A seed that appears twice in a group is flagged in the tables and in summary.json ("repeated_seeds").
For each checkpoint choice (best.pth: chosen with validation labels; last.pth: the label-free choice) and setting
(before / after CRF) one table: every run, then per group the mean +- the sample standard deviation and the range.
Unfinished runs (config.json without final_metrics.json) and runs whose files cannot be read are left out, each kind
said in one line.
``write_summary`` writes it as ``summary.md``, ``summary.json`` and ``summary.csv`` (full precision, in percent as
final_metrics.json), and ``summary_curves.png``: the validation curves of every run, per group with their mean and
range.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from engine.rundir import (CHECKPOINTS, CONFIG_FILE, DATA_FILE, FINAL_METRICS, LOG_FILE, METRIC_NAMES, SETTINGS,
                           SUMMARY_CSV, SUMMARY_CURVES, SUMMARY_FILES, SUMMARY_JSON, SUMMARY_MD, read_log)
from config import NO_EFFECT, config_from_dict, config_to_dict, option_keys
from utils.errors import ConfigError, UserError
from utils.files import to_json, write_text_atomically
from engine.plots import save_group_curves

log = logging.getLogger(__name__)

# The seed changes the computation but tells the runs of one experiment apart (it is what varies in a group); the
# device changes the kernels and what precision "auto" means, yet one experiment may run on several machines.
RUN_NOT_EXPERIMENT = ("seed", "device")
# options left out when runs are grouped: those that do not change what a run computes, and the two above
NOT_THE_EXPERIMENT = option_keys(NO_EFFECT) + RUN_NOT_EXPERIMENT
DATA_KEY = "data"  # the option under which a run's data is compared: a short hash of its fingerprint
DATA_HASH_CHARS = 8  # hex digits of that hash shown (32 bits: two data sets of one study do not collide)


@dataclass
class Run:
    path: Path
    options: dict[str, Any]  # flattened dotted keys of the experiment (NOT_THE_EXPERIMENT left out), and DATA_KEY
    seed: Any
    metrics: dict[str, Any]  # final_metrics.json


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return out


def find_runs(arguments: Sequence[str]) -> list[Run]:
    """The finished run directories named or below the folders named, in path order. Unfinished ones (a config.json
    without final_metrics.json) and ones whose files cannot be read are left out, with a line that names them."""
    finished: list[Path] = []
    unfinished: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            raise UserError(f"{argument}: not a folder (give run directories or folders that hold them)")
        finished += [p.parent for p in sorted(path.rglob(FINAL_METRICS))]
        unfinished += [p.parent for p in sorted(path.rglob(CONFIG_FILE)) if not (p.parent / FINAL_METRICS).exists()]
    if unfinished:
        unfinished = list(dict.fromkeys(unfinished))
        log.warning("%d run%s without %s (unfinished, or trained without validation labels) left out: %s",
                    len(unfinished), "s" if len(unfinished) > 1 else "", FINAL_METRICS, ", ".join(map(str, unfinished)))
    if not finished:
        raise UserError(f"no {FINAL_METRICS} below {', '.join(arguments)}: run.py writes it at the end of a run")
    runs = []
    for folder in dict.fromkeys(finished):  # each once, in order
        try:
            runs.append(read_run(folder))
        except UserError as err:
            log.warning("%s; run left out", err)
    if not runs:
        raise UserError(f"no readable run below {', '.join(arguments)}")
    return runs


def read_run(folder: Path) -> Run:
    """A finished run directory's options, data, seed and metrics; ``UserError`` naming a file that cannot be read."""
    config = _read_json(folder / CONFIG_FILE)
    metrics = _read_json(folder / FINAL_METRICS)
    options = {k: v for k, v in flatten(with_defaults(config, folder / CONFIG_FILE)).items()
               if not any(k == drop or k.startswith(drop) for drop in NOT_THE_EXPERIMENT)}
    options[DATA_KEY] = json.dumps(data_of(folder, config))
    return Run(folder, options, config.get("seed"), metrics)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise UserError(f"{path}: cannot read it ({err})") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(content).__name__}")
    return content


def data_of(folder: Path, config: dict[str, Any]) -> str:
    """What a run's data is compared by: a short hash of the fingerprint it recorded, or for a run folder without one
    (written before runs recorded it) its ``dataset.data_path``."""
    if not (folder / DATA_FILE).exists():
        dataset = config.get("dataset")
        return f"{dataset.get('data_path') if isinstance(dataset, dict) else None} (no {DATA_FILE})"
    recorded = json.dumps(_read_json(folder / DATA_FILE), sort_keys=True)
    return hashlib.sha256(recorded.encode("utf-8")).hexdigest()[:DATA_HASH_CHARS]


def with_defaults(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The options of a config.json with the default of every key it does not name (written before the key existed),
    so that runs of older and newer versions compare by what they computed; options this version cannot read are
    compared as written."""
    try:
        return config_to_dict(config_from_dict(config, source=str(path)))
    except ConfigError:
        return config


def groups_of(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by their experiment, named by the options in which the experiments differ ("all runs" for one)."""
    by_options: dict[tuple, list[Run]] = {}
    for run in runs:
        by_options.setdefault(tuple(sorted(run.options.items())), []).append(run)
    keys = sorted({k for run in runs for k in run.options})
    varying = [k for k in keys if len({run.options.get(k) for run in runs}) > 1]
    named = {}
    for members in by_options.values():
        label = " ".join(f"{k}={json.loads(members[0].options[k]) if k in members[0].options else '-'}"
                         for k in varying)
        named[label or "all runs"] = members
    return named


def statistics_of(values: list[float]) -> dict[str, Optional[float]]:
    """n, mean, sample standard deviation (None for one value), min and max of the finite values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(finite), "mean": statistics.fmean(finite),
            "std": statistics.stdev(finite) if len(finite) > 1 else None, "min": min(finite), "max": max(finite)}


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Every group's statistics of every checkpoint that some run has (runs of earlier versions have no
    label_free.pth), setting and metric, with the runs and the repeated seeds."""
    groups = groups_of(runs)
    present = [checkpoint for checkpoint in CHECKPOINTS if any(checkpoint in r.metrics for r in runs)]
    out: dict[str, Any] = {"runs": [{"path": str(r.path), "seed": r.seed, "group": g,
                                     "data": json.loads(r.options[DATA_KEY])} for g, rs in groups.items() for r in rs],
                           "groups": {}, "repeated_seeds": repeated_seeds(groups)}
    for group, members in groups.items():
        out["groups"][group] = {
            checkpoint: {setting: {metric: statistics_of([r.metrics.get(checkpoint, {}).get(setting, {}).get(metric)
                                                          for r in members]) for metric in METRIC_NAMES}
                         for setting in SETTINGS}
            for checkpoint in present}
    return out


def repeated_seeds(groups: dict[str, list[Run]]) -> list[dict[str, Any]]:
    """Every seed that more than one run of a group has: {"group", "seed", "runs": [paths]}. Its runs are counted as
    independent in the group's statistics, which they may not be (a run copied, or started twice)."""
    repeated = []
    for group, members in groups.items():
        by_seed: dict[str, list[str]] = {}
        for run in members:
            by_seed.setdefault(json.dumps(run.seed), []).append(str(run.path))
        repeated += [{"group": group, "seed": json.loads(seed), "runs": paths}
                     for seed, paths in by_seed.items() if len(paths) > 1]
    return repeated


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def tables(runs: list[Run], summary: dict[str, Any]) -> str:
    """Markdown: one table per checkpoint choice and setting, every run then every group's statistics."""
    group_of = {r["path"]: r["group"] for r in summary["runs"]}
    lines = []
    for checkpoint, file in CHECKPOINTS.items():
        for setting, label in SETTINGS.items():
            if not any(setting in r.metrics.get(checkpoint, {}) for r in runs):
                continue
            lines += [f"### {file} {label}", "", "| run | seed | group | " + " | ".join(METRIC_NAMES) + " |",
                      "|---|---|---|" + "---|" * len(METRIC_NAMES)]
            for r in runs:
                values = r.metrics.get(checkpoint, {}).get(setting, {})
                lines.append(f"| {r.path.name} | {r.seed} | {group_of[str(r.path)]} | "
                             + " | ".join(_cell(values.get(m)) for m in METRIC_NAMES) + " |")
            for group, stats in summary["groups"].items():
                cells = []
                for metric in METRIC_NAMES:
                    s = stats[checkpoint][setting][metric]
                    spread = f" +- {s['std']:.2f}" if s["std"] is not None else ""
                    cells.append("-" if s["mean"] is None else
                                 f"{s['mean']:.2f}{spread} ({s['min']:.2f}-{s['max']:.2f})")
                n = stats[checkpoint][setting][METRIC_NAMES[0]]["n"]
                flags = "".join(f", seed {r['seed']} {_times(len(r['runs']))}!" for r in summary["repeated_seeds"]
                                if r["group"] == group)
                lines.append(f"| **mean +- std (min-max)** | {n} runs{flags} | {group} | " + " | ".join(cells) + " |")
            lines.append("")
    for r in summary["repeated_seeds"]:
        lines.append(f"WARNING: in group {r['group']}, seed {r['seed']} appears {_times(len(r['runs']))} "
                     f"({', '.join(r['runs'])}); the statistics count these runs as independent: is one a copy of "
                     f"another?")
    return "\n".join(lines)


def write_summary(runs: list[Run], out_dir: Path, failed: Sequence[tuple[str, str]] = ()) -> list[Path]:
    """summary.md, summary.json, summary.csv and summary_curves.png in ``out_dir``; ``failed`` lists the runs of a
    sweep that did not finish, as (name, why), for summary.md and summary.json."""
    summary = summarize(runs)
    if failed:
        summary["failed"] = [{"run": name, "reason": reason} for name, reason in failed]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["group", "checkpoint", "setting", "metric", "n", "mean", "std", "min", "max"])
    for group, stats in summary["groups"].items():
        for checkpoint, settings in stats.items():
            for setting, metrics in settings.items():
                for metric, s in metrics.items():
                    writer.writerow([group, CHECKPOINTS[checkpoint], setting, metric, s["n"],
                                     *("" if s[k] is None else repr(s[k]) for k in ("mean", "std", "min", "max"))])
    markdown = "# Runs\n\n" + tables(runs, summary) + "\n"
    if failed:
        markdown += "## Runs that did not finish\n\n" + "".join(f"- {name}: {reason}\n" for name, reason in failed)
    texts = {SUMMARY_MD: markdown, SUMMARY_JSON: to_json(summary, indent=2) + "\n", SUMMARY_CSV: rows.getvalue()}
    paths = []
    for name in SUMMARY_FILES:
        write_text_atomically(out_dir / name, texts[name])
        paths.append(out_dir / name)
    group_of = {r["path"]: r["group"] for r in summary["runs"]}
    logs: dict[str, list[list[dict[str, Any]]]] = {}
    for run in runs:
        logs.setdefault(group_of[str(run.path)], []).append(read_log(run.path / LOG_FILE))
    save_group_curves(logs, out_dir / SUMMARY_CURVES)
    return paths + [out_dir / SUMMARY_CURVES]

