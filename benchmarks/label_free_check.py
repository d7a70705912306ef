"""How well each label-free criterion chooses a checkpoint: the measurement behind train.label_free_criterion's default.

Trains the learning check's runs (json/camvid_check.json: seeds 0-2, the trained head and the frozen one,
optimizer.net.lr=0) with the final evaluation on CamVid's test split (eval.split=test), keeping the trainable weights
of every validation. Then, per head, over the seeds (mean +- std):
- the Spearman rank correlation of each criterion with the validation Cluster_mIoU and Cluster_Accuracy over each
  run's validations (a criterion where lower is better is negated first, so that +1 always means "ranks the
  checkpoints as the labels do");
- the checkpoint each rule picks (the labels on val, as best.pth; each criterion, by the rule label_free.pth is
  written by; the last one) evaluated on the test split, which chose nothing, before and after CRF.
Choosing reads the validation split only; the test split is read only to report. Runs already finished in --out are
kept (the script continues where it stopped).

Each finished run is summarised (its validations, picks, correlations and test metrics) in ``{name}.json`` of
``--records`` (default: ``--out``); a run with a summary there is not trained again, so that the records of runs
measured elsewhere (benchmarks/records/label_free_check/ holds those the documents report) complete the tables
without their weights.

    python benchmarks/label_free_check.py --out output/label_free_check            # about 3 hours on 2 CPU cores
    python benchmarks/label_free_check.py --out output/label_free_check --records benchmarks/records/label_free_check
    python benchmarks/label_free_check.py --out /tmp/quick --epochs 1 --seeds 0    # a quick look
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import engine.train  # noqa: E402
import run  # noqa: E402
from config.schema import LABEL_FREE_CRITERIA  # noqa: E402
from engine.checkpoint import load_checkpoint  # noqa: E402
from engine.criteria import HIGHER_IS_BETTER  # noqa: E402
from engine.rundir import CHECKPOINTS, FINAL_METRICS, LAST, LOG_FILE, METRIC_NAMES, SETTINGS, read_log  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.files import write_text_atomically  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ROOT / "json" / "camvid_check.json"
HEADS = {"trained": "0.001", "frozen": "0"}  # optimizer.net.lr of each head
VALIDATIONS = "validations.pth"  # in each run's folder: the trainable weights of every validation, by iteration
TRAINABLE = ("decoder.", "project_head.")  # the network's trained parts; the ViT ("model.") stays frozen
RULES = ("labels (best.pth)", *LABEL_FREE_CRITERIA, "last")


def train(name: str, seed: int, lr: str, args: argparse.Namespace) -> Path:
    """One run of the check, keeping the weights of each validation; a finished run is kept as it is."""
    run_dir = args.out / name
    if (run_dir / FINAL_METRICS).is_file() and (run_dir / VALIDATIONS).is_file():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short starts again
    kept: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    validate_and_save = engine.train.validate_and_save

    def keeping(r: engine.train.Run, journal: Any) -> None:
        validate_and_save(r, journal)
        net = {k: v.detach().cpu().clone() for k, v in r.net.module.state_dict().items() if k.startswith(TRAINABLE)}
        kept[r.progress.iteration] = {"net": net, "linear": _copy(r.linear.module), "cluster": _copy(r.cluster.module)}

    engine.train.validate_and_save = keeping
    try:
        status = run_main(run.main, ["--opt", str(OPTIONS), "--debug", f"output_dir={args.out}", f"wandb.name={name}",
                                     f"seed={seed}", f"optimizer.net.lr={lr}", f"train.epoch={args.epochs}",
                                     "eval.split=test", f"--data_path={args.data}"])
    finally:
        engine.train.validate_and_save = validate_and_save
    if status != 0:
        raise SystemExit(f"{name}: run.py ended with status {status}")
    torch.save(kept, run_dir / VALIDATIONS)
    return run_dir


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def picks(validations: list[dict[str, Any]]) -> dict[str, int]:
    """The iteration each rule picks, by the rules of run.py: best.pth's (the sum of the four metrics, a tie to the
    later one), label_free.pth's for each criterion (engine.train._choose_label_free), and the last validation."""
    chosen = {"last": validations[-1]["iter"]}
    best = -math.inf
    for record in validations:
        score = sum(record[m] for m in METRIC_NAMES)
        if score >= best:
            best, chosen["labels (best.pth)"] = score, record["iter"]
    for criterion in LABEL_FREE_CRITERIA:
        progress = engine.train.Progress()
        for record in validations:
            progress.iteration = record["iter"]
            engine.train._choose_label_free(progress, {criterion: _value(record[criterion])}, criterion)
        chosen[criterion] = progress.label_free_iter
    return chosen


def _value(value: Any) -> float:
    return math.nan if value is None else float(value)


def scored(run_dir: Path) -> dict[int, dict[str, dict[str, float]]]:
    """The test-split metrics of the run's own final evaluation (eval.split=test), by the iteration of the
    checkpoint: best.pth's, last.pth's and label_free.pth's."""
    final = json.loads((run_dir / FINAL_METRICS).read_text())
    return {load_checkpoint(run_dir / file)["iter"]: final[name] for name, file in CHECKPOINTS.items()}


def test_metrics(run_dir: Path, iteration: int) -> dict[str, dict[str, float]]:
    """The test-split metrics of the weights of the validation at ``iteration``: from the run's final evaluation,
    else evaluated once (and read back when the script continues)."""
    known = scored(run_dir)
    if iteration in known:
        return known[iteration]
    out = run_dir / f"pick_{iteration}"
    report = out / "eval_report.json"
    if not report.is_file():
        ckpt = load_checkpoint(run_dir / LAST)
        kept = torch.load(run_dir / VALIDATIONS, weights_only=True)[iteration]
        ckpt["net_model_state_dict"].update(kept["net"])
        ckpt["linear_model_state_dict"], ckpt["cluster_model_state_dict"] = kept["linear"], kept["cluster"]
        out.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out / "weights.pth")
        eval_script = importlib.import_module("eval")
        if run_main(eval_script.main, ["--checkpoint", str(out / "weights.pth"), "--debug", "--out", str(out),
                                       "eval.split=test", "eval.is_visualize=false"]) != 0:
            raise SystemExit(f"{out}: evaluation failed")
        (out / "weights.pth").unlink()
    data = json.loads(report.read_text())
    assert data["split"] == "test"
    return {setting: data[setting] for setting in SETTINGS}


def correlations(validations: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Spearman's rho of each criterion (negated where lower is better) with the validation Cluster metrics."""
    out = {}
    for criterion in LABEL_FREE_CRITERIA:
        pairs = [(_value(r[criterion]), r) for r in validations if math.isfinite(_value(r[criterion]))]
        sign = 1 if HIGHER_IS_BETTER[criterion] else -1
        out[criterion] = {metric: float(spearmanr([sign * v for v, _ in pairs], [r[metric] for _, r in pairs])[0])
                          if len(pairs) > 2 else math.nan for metric in ("Cluster_mIoU", "Cluster_Accuracy")}
    return out


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    spread = f" +- {statistics.stdev(finite):.2f}" if len(finite) > 1 else ""
    return f"{statistics.fmean(finite):.2f}{spread}"


def tables(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["### Spearman correlation with the validation metrics, over each run's validations", "",
             "| head | criterion | with Cluster_mIoU | with Cluster_Accuracy |", "|---|---|---|---|"]
    for head, runs in results.items():
        for criterion in LABEL_FREE_CRITERIA:
            lines.append(f"| {head} | {criterion} | " + " | ".join(
                mean_std([r["correlations"][criterion][m] for r in runs]) for m in ("Cluster_mIoU", "Cluster_Accuracy"))
                + " |")
    lines += ["", "### The checkpoint each rule picks, on the validation split that chose it, before CRF", "",
              "| head | rule | iteration | " + " | ".join(METRIC_NAMES) + " |", "|---|---|---|" + "---|" * 4]
    for head, runs in results.items():
        for rule in RULES:
            iterations = ", ".join(str(r["picks"][rule]) for r in runs)
            lines.append(f"| {head} | {rule} | {iterations} | " + " | ".join(
                mean_std([_validation(r, r["picks"][rule])[m] for r in runs]) for m in METRIC_NAMES) + " |")
    for setting, label in SETTINGS.items():
        lines += ["", f"### The checkpoint each rule picks, on the test split, {label}", "",
                  "| head | rule | iteration | " + " | ".join(METRIC_NAMES) + " |", "|---|---|---|" + "---|" * 4]
        for head, runs in results.items():
            for rule in RULES:
                iterations = ", ".join(str(r["picks"][rule]) for r in runs)
                lines.append(f"| {head} | {rule} | {iterations} | " + " | ".join(
                    mean_std([r["test"][rule][setting][m] for r in runs]) for m in METRIC_NAMES) + " |")
    return "\n".join(lines) + "\n"


def measure(name: str, seed: int, lr: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run trained (or kept), its picks evaluated on the test split: its summary."""
    run_dir = train(name, seed, lr, args)
    validations = [r for r in read_log(run_dir / LOG_FILE) if r.get("type") == "val"]
    chosen = picks(validations)
    label_free = load_checkpoint(run_dir / "label_free.pth")["label_free"]
    assert chosen[label_free["criterion"]] == label_free["iter"]  # the run chose by the same rule
    return {"seed": seed, "picks": chosen, "correlations": correlations(validations),
            "test": {rule: test_metrics(run_dir, chosen[rule]) for rule in RULES}, "validations": validations}


def _validation(run: dict[str, Any], iteration: int) -> dict[str, Any]:
    return next(r for r in run["validations"] if r["iter"] == iteration)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs and the tables")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid",
                        help="a directory-layout set with imgs/test and labels/test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=23, help="train.epoch (the check's 23: 506 iterations)")
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS))
    parser.add_argument("--records", type=Path, help="folder of the runs' summaries (default: --out)")
    args = parser.parse_args()
    records = args.records or args.out
    records.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {head: [] for head in args.heads}
    for head in args.heads:
        for seed in args.seeds:
            name = f"{head}_seed{seed}"
            summary = records / f"{name}.json"
            if not summary.is_file():
                write_text_atomically(summary, json.dumps(measure(name, seed, HEADS[head], args), indent=1) + "\n")
            results[head].append(json.loads(summary.read_text()))
    text = tables(results)
    (args.out / "label_free_check.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")
    (args.out / "label_free_check.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
