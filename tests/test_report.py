"""python -m tools.report: runs grouped by everything but the seed, mean +- std and min-max, in three files."""
import csv
import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

import run
from dataset import build_dataset, fingerprint
from tests.conftest import patch_ppap_loss, tiny_options
from engine import report
from engine.rundir import DATA_FILE, METRIC_NAMES
from tools import report as report_command
from utils.cli import run_main
from config import config_to_dict, load_config


def fake_run(folder, data, seed, pos, values, output_dir, recorded=True):
    """A finished run's config.json (the real options, as run.py writes them), final_metrics.json and, unless
    ``recorded`` is false (a run of a version before it), the fingerprint of its data."""
    cfg = load_config(tiny_options(folder / "opts", data), [f"seed={seed}", f"training_coeff.initialcrit_pos={pos}",
                                                           f"output_dir={output_dir}"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    if recorded:
        splits = {mode: build_dataset(cfg.dataset, mode) for mode in ("train", "val")}
        (folder / DATA_FILE).write_text(json.dumps(fingerprint(splits, cfg.dataset.data_path)))
    metrics = {name: {"no_crf": dict(zip(METRIC_NAMES, v)), "crf": dict(zip(METRIC_NAMES, v + 1))}
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
        for i, metric in enumerate(METRIC_NAMES):
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


VALUES = np.array([10.0, 20, 30, 40])


@pytest.fixture
def moved_data(tiny_data, tmp_path):
    """The tiny data set copied to another folder."""
    return shutil.copytree(tiny_data, tmp_path / "moved")


@pytest.fixture
def other_data(tiny_data, tmp_path):
    """A data set of the same type with one validation image fewer."""
    other = shutil.copytree(tiny_data, tmp_path / "other")
    for kind in ("imgs", "labels"):
        (other / kind / "val" / "003.png").unlink()
    return other


def test_runs_on_different_data_never_share_a_row(tiny_data, other_data, tmp_path):
    fake_run(tmp_path / "runs" / "a", tiny_data, 0, 0.5, VALUES, tmp_path)
    fake_run(tmp_path / "runs" / "b", other_data, 1, 0.5, VALUES + 1, tmp_path)
    summary = report.summarize(report.find_runs([str(tmp_path / "runs")]))
    assert len(summary["groups"]) == 2


def test_runs_on_the_same_data_moved_to_another_path_share_a_row(tiny_data, moved_data, tmp_path):
    fake_run(tmp_path / "runs" / "a", tiny_data, 0, 0.5, VALUES, tmp_path)
    fake_run(tmp_path / "runs" / "b", moved_data, 1, 0.5, VALUES + 1, tmp_path)
    summary = report.summarize(report.find_runs([str(tmp_path / "runs")]))
    assert summary["groups"]["all runs"]["best"]["no_crf"]["Cluster_mIoU"]["n"] == 2


def test_runs_without_a_data_fingerprint_are_grouped_by_their_data_path(tiny_data, moved_data, tmp_path):
    fake_run(tmp_path / "runs" / "a", tiny_data, 0, 0.5, VALUES, tmp_path, recorded=False)
    fake_run(tmp_path / "runs" / "b", moved_data, 1, 0.5, VALUES + 1, tmp_path, recorded=False)
    fake_run(tmp_path / "runs" / "c", moved_data, 2, 0.5, VALUES + 2, tmp_path, recorded=False)
    summary = report.summarize(report.find_runs([str(tmp_path / "runs")]))
    assert sorted(stats["best"]["no_crf"]["Cluster_mIoU"]["n"] for stats in summary["groups"].values()) == [1, 2]


def test_a_run_records_the_fingerprint_of_its_data_when_it_starts(tiny_data, tmp_path, monkeypatch):
    options = tiny_options(tmp_path, tiny_data)
    patch_ppap_loss(monkeypatch, interrupt_at=1)  # Ctrl-C in the first iteration, before any checkpoint
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 130
    recorded = json.loads((tmp_path / "output" / "tiny" / DATA_FILE).read_text())
    assert {mode: recorded[mode]["images"] for mode in ("train", "val")} == {"train": 16, "val": 4}


def test_the_fingerprint_of_data_moved_to_another_path_is_the_same(tiny_data, moved_data):
    cfg = load_config(tiny_options(moved_data.parent / "opts", tiny_data))
    splits = {mode: build_dataset(cfg.dataset, mode) for mode in ("train", "val")}
    moved_cfg = dataclasses.replace(cfg.dataset, data_path=str(moved_data))
    moved = {mode: build_dataset(moved_cfg, mode) for mode in ("train", "val")}
    assert fingerprint(splits, tiny_data) == fingerprint(moved, moved_data)


def test_a_seed_twice_in_a_group_is_flagged(tiny_data, tmp_path, capsys):
    for name in ("a", "b"):
        fake_run(tmp_path / "runs" / name, tiny_data, 0, 0.5, VALUES, tmp_path)
    assert run_main(report_command.main, [str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 0
    assert "seed 0 twice" in capsys.readouterr().out


def test_a_seed_twice_in_a_group_is_listed_in_summary_json(tiny_data, tmp_path):
    for name in ("a", "b"):
        fake_run(tmp_path / "runs" / name, tiny_data, 0, 0.5, VALUES, tmp_path)
    report.write_summary(report.find_runs([str(tmp_path / "runs")]), tmp_path / "out")
    repeated = json.loads((tmp_path / "out" / "summary.json").read_text())["repeated_seeds"]
    assert repeated == [{"group": "all runs", "seed": 0,
                         "runs": [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")]}]


def test_unfinished_runs_are_named_in_one_line(tiny_data, tmp_path, caplog):
    fake_run(tmp_path / "runs" / "done", tiny_data, 0, 0.5, VALUES, tmp_path)
    for name in ("stopped", "running"):
        fake_run(tmp_path / "runs" / name, tiny_data, 1, 0.5, VALUES, tmp_path)
        (tmp_path / "runs" / name / "final_metrics.json").unlink()
    with caplog.at_level(logging.WARNING, logger="engine.report"):
        runs = report.find_runs([str(tmp_path / "runs")])
    assert [r.path.name for r in runs] == ["done"]
    [line] = caplog.messages
    assert "2 runs" in line and "running" in line and "stopped" in line


def test_a_corrupt_config_json_is_skipped_with_one_line(tiny_data, tmp_path, caplog):
    for name in ("good", "bad"):
        fake_run(tmp_path / "runs" / name, tiny_data, 0 if name == "good" else 1, 0.5, VALUES, tmp_path)
    (tmp_path / "runs" / "bad" / "config.json").write_text('{"seed": 1, "dataset": ')  # cut short
    with caplog.at_level(logging.WARNING, logger="engine.report"):
        status = run_main(report_command.main, [str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert status == 0
    [line] = caplog.messages
    assert str(tmp_path / "runs" / "bad" / "config.json") in line
