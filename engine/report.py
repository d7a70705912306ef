"""The final metrics of many runs in one table, grouped by everything but the seed, with mean +- standard deviation
and min-max per group (``python -m tools.report`` and the end of a sweep).

Runs are grouped by their options with the seed and the options that do not change what is computed left out (paths,
wandb, printing, workers, the evaluation's worker count); a group is named by the options in which the groups differ.
For each checkpoint choice (best.pth: chosen with validation labels; last.pth: the label-free choice) and setting
(before / after CRF) one table: every run, then per group the mean +- the sample standard deviation and the range.
``write_summary`` writes it as ``summary.md``, ``summary.json`` and ``summary.csv`` (full precision, in percent as
final_metrics.json), and ``summary_curves.png``: the validation curves of every run, per group with their mean and
range.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from engine.evaluate import METRIC_NAMES
from engine.journal import read_log
from engine.train import CONFIG_FILE, FINAL_METRICS, LOG_FILE
from utils.config import config_from_dict, config_to_dict
from utils.errors import ConfigError, UserError
from utils.files import to_json, write_text_atomically
from utils.visualize import save_group_curves

CHECKPOINTS = {"best": "best.pth", "last": "last.pth"}
SETTINGS = {"no_crf": "before CRF", "crf": "after CRF"}
# options that do not change what a run computes: left out when runs are grouped (the seed is what varies in a group)
NOT_THE_EXPERIMENT = ("seed", "output_dir", "checkpoint", "gpu_ids", "device", "wandb.", "dataset.data_path",
                      "dataloader.num_workers", "train.print_freq", "eval.crf_workers", "eval.n_images",
                      "eval.is_visualize")
SUMMARY_FILES = ("summary.md", "summary.json", "summary.csv")
SUMMARY_CURVES = "summary_curves.png"


@dataclass
class Run:
    path: Path
    options: dict[str, Any]  # flattened dotted keys of the experiment (NOT_THE_EXPERIMENT left out)
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
    """The run directories named or below the folders named, in path order."""
    folders: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            raise UserError(f"{argument}: not a folder (give run directories or folders that hold them)")
        folders += [p.parent for p in sorted(path.rglob(FINAL_METRICS))]
    if not folders:
        raise UserError(f"no {FINAL_METRICS} below {', '.join(arguments)}: run.py writes it at the end of a run")
    runs = []
    for folder in dict.fromkeys(folders):  # each once, in order
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            metrics = json.loads((folder / FINAL_METRICS).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserError(f"{folder}: cannot read its {CONFIG_FILE} and {FINAL_METRICS} ({err})") from None
        options = {k: v for k, v in flatten(with_defaults(config, folder / CONFIG_FILE)).items()
                   if not any(k == drop or k.startswith(drop) for drop in NOT_THE_EXPERIMENT)}
        runs.append(Run(folder, options, config.get("seed"), metrics))
    return runs


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
    groups = groups_of(runs)
    out: dict[str, Any] = {"runs": [{"path": str(r.path), "seed": r.seed, "group": g} for g, rs in groups.items()
                                    for r in rs], "groups": {}}
    for group, members in groups.items():
        out["groups"][group] = {
            checkpoint: {setting: {metric: statistics_of([r.metrics.get(checkpoint, {}).get(setting, {}).get(metric)
                                                          for r in members]) for metric in METRIC_NAMES}
                         for setting in SETTINGS}
            for checkpoint in CHECKPOINTS}
    return out


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
                lines.append(f"| **mean +- std (min-max)** | {n} runs | {group} | " + " | ".join(cells) + " |")
            lines.append("")
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
    texts = {"summary.md": markdown, "summary.json": to_json(summary, indent=2) + "\n", "summary.csv": rows.getvalue()}
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

