"""python -m tools.report: runs grouped by everything but the seed, mean +- std and min-max, in three files."""
import csv
import json

import numpy as np
import pytest

from tests.conftest import tiny_options
from engine import report
from tools import report as report_command
from utils.cli import run_main
from utils.config import config_to_dict, load_config


def fake_run(folder, data, seed, pos, values, output_dir):
    """A finished run's config.json (the real options, as run.py writes them) and final_metrics.json."""
    cfg = load_config(tiny_options(folder / "opts", data), [f"seed={seed}", f"training_coeff.initialcrit_pos={pos}",
                                                           f"output_dir={output_dir}"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    metrics = {name: {"no_crf": dict(zip(report.METRIC_NAMES, v)), "crf": dict(zip(report.METRIC_NAMES, v + 1))}
               for name, v in (("best", values), ("last", values - 2))}
    (folder / "final_metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def sweep(tiny_data, tmp_path):
    rng = np.random.default_rng(0)
    values = {}
    for pos in (0.5, 0.6):
        for seed in (0, 1, 2):
            values[(pos, seed)] = rng.uniform(20, 80, size=4)
            fake_run(tmp_path / "sweep" / f"pos={pos},seed={seed}", tiny_data, seed, pos, values[(pos, seed)],
                     tmp_path / f"elsewhere{seed}")  # another output_dir per run: not part of the experiment
    return tmp_path / "sweep", values


def test_runs_are_grouped_by_everything_but_the_seed(sweep, tmp_path, capsys):
    folder, values = sweep
    assert run_main(report_command.main, [str(folder), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["groups"]) == {"training_coeff.initialcrit_pos=0.5", "training_coeff.initialcrit_pos=0.6"}
    for pos in (0.5, 0.6):
        got = summary["groups"][f"training_coeff.initialcrit_pos={pos}"]
        runs = np.array([values[(pos, seed)] for seed in (0, 1, 2)])
        for i, metric in enumerate(report.METRIC_NAMES):
            stats = got["best"]["no_crf"][metric]
            assert stats["n"] == 3
            assert stats["mean"] == pytest.approx(runs[:, i].mean(), rel=1e-12)
            assert stats["std"] == pytest.approx(runs[:, i].std(ddof=1), rel=1e-12)
            assert (stats["min"], stats["max"]) == (pytest.approx(runs[:, i].min()), pytest.approx(runs[:, i].max()))
            assert got["last"]["crf"][metric]["mean"] == pytest.approx(runs[:, i].mean() - 1, rel=1e-12)
    out = capsys.readouterr().out
    assert "### best.pth before CRF" in out and "### last.pth after CRF" in out and "3 runs" in out
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert len(rows) == 2 * 2 * 2 * 4  # groups x checkpoints x settings x metrics, full precision
    assert float(rows[0]["mean"]) == summary["groups"][rows[0]["group"]]["best"]["no_crf"][rows[0]["metric"]]["mean"]
    assert (tmp_path / "out" / "summary.md").read_text().startswith("# Runs")


def test_one_run_per_group_has_no_spread(tiny_data, tmp_path):
    fake_run(tmp_path / "a", tiny_data, 0, 0.5, np.array([10.0, 20, 30, 40]), tmp_path)
    summary = report.summarize(report.find_runs([str(tmp_path / "a")]))
    stats = summary["groups"]["all runs"]["best"]["no_crf"]["Cluster_mIoU"]
    assert stats == {"n": 1, "mean": 10.0, "std": None, "min": 10.0, "max": 10.0}


def test_no_runs_is_a_usage_error(tmp_path, capsys):
    assert run_main(report_command.main, [str(tmp_path)]) == 2
    assert "no final_metrics.json below" in capsys.readouterr().err


def test_a_run_written_before_a_key_existed_groups_with_its_default(tiny_data, tmp_path):
    for seed in (0, 1):
        fake_run(tmp_path / f"seed={seed}", tiny_data, seed, 0.5, np.array([10.0, 20, 30, 40]) + seed, tmp_path)
    older = json.loads((tmp_path / "seed=0" / "config.json").read_text())
    del older["deterministic"], older["eval"]["crf_backend"]  # keys this version added, at their defaults
    (tmp_path / "seed=0" / "config.json").write_text(json.dumps(older))
    summary = report.summarize(report.find_runs([str(tmp_path)]))
    assert list(summary["groups"]) == ["all runs"]
    assert summary["groups"]["all runs"]["best"]["no_crf"]["Cluster_mIoU"]["n"] == 2
