"""What the second stage adds: the first stage against the second on CamVid's test split, over seeds.

For each seed, the second stage (json/camvid_selftrain.json, with any overrides given) trains from the first stage's
label_free.pth of that seed: the trained-head run of benchmarks/label_free_check.py, whose final evaluation is on the
test split. The second stage's final evaluation is on the test split too, and its checkpoints are chosen on the
validation split (best.pth with its labels, label_free.pth without). Per rule, before and after CRF, mean +- std over
the seeds: the first stage's label_free.pth, best.pth and last.pth, the second stage's, and the difference of the
label-free choices; and each stage's training speed from its log (images/s of the train lines).
Runs already finished in --out are kept (the script continues where it stopped).

    python benchmarks/label_free_check.py --out output/label_free_check                  # the first stages
    python benchmarks/self_training_check.py --first output/label_free_check --out output/self_training_check
    python benchmarks/self_training_check.py ... --out output/st_fixed self_training.teacher=fixed   # a variant
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import run  # noqa: E402
from engine.rundir import FINAL_METRICS, LOG_FILE, METRIC_NAMES, SETTINGS, read_log  # noqa: E402
from utils.cli import run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ROOT / "json" / "camvid_selftrain.json"
FIRST_RUN = "trained_seed{seed}"  # benchmarks/label_free_check.py's run of the trained head
RULES = ("label_free", "best", "last")


def second_stage(seed: int, args: argparse.Namespace) -> Path:
    """The second stage of ``seed`` (a finished one is kept as it is)."""
    first = args.first / FIRST_RUN.format(seed=seed)
    if not (first / FINAL_METRICS).is_file():
        raise SystemExit(f"{first / FINAL_METRICS} not found: run benchmarks/label_free_check.py --out {args.first}")
    name = f"seed{seed}"
    if (args.out / name / FINAL_METRICS).is_file():
        return args.out / name
    status = run_main(run.main, ["--opt", str(OPTIONS), "--debug", f"output_dir={args.out}", f"wandb.name={name}",
                                 f"seed={seed}", f"self_training.checkpoint={first / 'label_free.pth'}",
                                 "eval.split=test", f"--data_path={args.data}", *args.overrides])
    if status != 0:
        raise SystemExit(f"{name}: run.py ended with status {status}")
    return args.out / name


def images_per_second(run_dir: Path) -> float:
    lines = [r for r in read_log(run_dir / LOG_FILE) if r["type"] == "train" and r["iter"] > 1]  # the first warms up
    return statistics.mean(r["images_per_s"] for r in lines)


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def tables(results: list[dict[str, Any]]) -> str:
    """Markdown: one table per setting (before, after CRF), a row per stage and rule, and the speed."""
    out = []
    for setting in ("no_crf", "crf"):
        out += [f"### CamVid test, {SETTINGS[setting]}, mean +- std over seeds {[r['seed'] for r in results]}", "",
                "| stage | checkpoint | " + " | ".join(METRIC_NAMES) + " |", "|---|---|" + "---|" * len(METRIC_NAMES)]
        for stage in ("first", "second"):
            for rule in RULES:
                cells = [mean_std([r[stage][rule][setting][m] for r in results]) for m in METRIC_NAMES]
                out.append(f"| {stage} | {rule}.pth | " + " | ".join(cells) + " |")
        gains = [mean_std([r["second"]["label_free"][setting][m] - r["first"]["label_free"][setting][m]
                           for r in results]) for m in METRIC_NAMES]
        out += ["| second - first | label_free.pth | " + " | ".join(gains) + " |", ""]
    speed = [(r["first_images_per_s"], r["second_images_per_s"]) for r in results]
    out.append("training speed from the logs (images/s, first -> second stage): " +
               ", ".join(f"seed {r['seed']}: {a:.1f} -> {b:.1f}" for r, (a, b) in zip(results, speed)))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=Path, required=True, help="benchmarks/label_free_check.py's --out")
    parser.add_argument("--out", type=Path, required=True, help="folder of the second stages and the tables")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid",
                        help="CamVid in the directory layout, with imgs/test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="key=value options of the second stage (a variant)")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        first, second = args.first / FIRST_RUN.format(seed=seed), second_stage(seed, args)
        metrics = [json.loads((d / FINAL_METRICS).read_text()) for d in (first, second)]
        results.append({"seed": seed, "first": metrics[0], "second": metrics[1],
                        "first_images_per_s": images_per_second(first),
                        "second_images_per_s": images_per_second(second)})
    text = tables(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "self_training_check.md").write_text(text)
    (args.out / "self_training_check.json").write_text(json.dumps({"overrides": args.overrides, "runs": results},
                                                                  indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
