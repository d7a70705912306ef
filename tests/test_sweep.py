"""run.py --multirun: Hydra's override grammar, one run per combination in its own folder, a sweep that survives an
interruption and a failed run, and the summary at its end."""
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import run
from engine.checkpoint import load_checkpoint
from engine.rundir import CONSOLE_FILE, SWEEP_FILE
from engine.sweep import device_slots, plan_sweep, run_sweep
from tests.conftest import ROOT, tiny_options
from tests.test_signals import WAIT_S, alive, children, wait_for
from utils.cli import run_main
from config import load_config
from utils.errors import ConfigError
from config.overrides import Setting, is_sweep, parse_sweep, run_name
from engine.plots import mean_and_range


def values(item):
    (axis,) = parse_sweep([item]).axes
    return [s.value for s in axis]


def test_comma_lists_ranges_and_choices_are_sweeps():
    assert values("seed=0,1,2") == [0, 1, 2]
    assert values("seed=range(0,5)") == [0, 1, 2, 3, 4]
    assert values("training_coeff.tau=range(0.5,1,0.25)") == [0.5, 0.75]
    assert values("optimizer.net.lr=choice(1e-3,5e-4)") == [0.001, 0.0005]
    assert values("wandb.notes=a b,c") == ["a b", "c"]


def test_quoted_commas_and_bracket_lists_are_one_value():
    fixed = parse_sweep(["wandb.notes='a,b'", "wandb.tags=[x,y]", "seed=0,1"]).fixed
    assert [(s.key, s.value) for s in fixed] == [("wandb.notes", "a,b"), ("wandb.tags", ["x", "y"])]


def test_combinations_follow_the_command_line_with_the_last_key_fastest():
    points = parse_sweep(["seed=0,1", "training_coeff.tau=0.5,0.8"]).points()
    assert [[s.value for s in p] for p in points] == [[0, 0.5], [0, 0.8], [1, 0.5], [1, 0.8]]
    assert [run_name(p) for p in points][1] == "seed=0,training_coeff.tau=0.8"


@pytest.mark.parametrize("value", [0.001, 1e-05, "1e-3", "yes", "a,b", "", None, True, ["x", "y"], 2**64])
def test_a_setting_reaches_the_run_as_the_same_value_and_type(value):
    key, got = Setting("wandb.notes", value, "").override.split("=", 1)
    from omegaconf import OmegaConf

    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"a={got}"]))["a"]
    assert parsed == value and type(parsed) is type(value)


def test_a_string_value_stays_a_string_in_the_run_options(tiny_data, tmp_path):
    (axis,) = parse_sweep(["wandb.notes='1e-3','null'"]).axes
    options = tiny_options(tmp_path, tiny_data)
    assert [load_config(options, [s.override]).wandb.notes for s in axis] == ["1e-3", "null"]


@pytest.mark.parametrize("item, message", [
    ("+seed=1", "keys are fixed"), ("~seed", "keys are fixed"), ("seed=interval(0,1)", "cannot be run"),
    ("wandb.notes=it's", "not in Hydra's override grammar"), ("seed=1,", "not in Hydra's override grammar")])
def test_what_a_sweep_cannot_run_is_refused(item, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep([item, "seed=0,1"] if not item.startswith(("+seed", "~seed", "seed")) else [item])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_sweep(["seed=0,1", "seed=2"])


def test_a_folder_name_never_holds_a_slash():
    (point,) = parse_sweep(["dataset.data_path=/data/a,b/c"]).points()[:1]
    assert run_name(point) == "dataset.data_path=_data_a"


def test_a_comma_list_without_multirun_suggests_it(tiny_data, tmp_path, capsys):
    options = tiny_options(tmp_path, tiny_data)
    assert run_main(run.main, ["--opt", str(options), "--debug", "seed=0,1"]) == 2
    err = capsys.readouterr().err
    assert "'seed=0,1' gives several values: add --multirun" in err
    assert not (tmp_path / "output").exists()


def test_single_run_overrides_keep_their_parsing():
    assert not is_sweep("wandb.notes='a,b'") and not is_sweep("wandb.notes=it's") and not is_sweep("seed=3")
    assert is_sweep("seed=0,1") and is_sweep("seed=range(3)")


def test_every_run_is_checked_before_the_first_starts(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data)
    with pytest.raises(ConfigError, match="dataset.res"):
        plan_sweep(str(options), ["dataset.res=64,65"])  # 65 is not a multiple of the patch
    assert not (tmp_path / "output").exists()


def test_the_runs_live_in_the_sweep_folder_named_by_their_values(tiny_data, tmp_path):
    plan = plan_sweep(str(tiny_options(tmp_path, tiny_data)), ["seed=0,1", "train.epoch=2"])
    assert plan.folder == tmp_path / "output" / "tiny"
    assert [r.name for r in plan.runs] == ["seed=0", "seed=1"]
    cfg = load_config(tiny_options(tmp_path, tiny_data), plan.runs[1].overrides)
    assert (cfg.seed, cfg.train.epoch, cfg.wandb.name, cfg.wandb.group) == (1, 2, "seed=1", "tiny")
    assert cfg.output_dir == str(plan.folder)


def test_the_folder_names_cannot_be_swept(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="wandb.name names the sweep's folder"):
        plan_sweep(str(tiny_options(tmp_path, tiny_data)), ["wandb.name=a,b"])


def test_jobs_needs_a_gpu_per_run(tiny_data, tmp_path):
    cfg = load_config(tiny_options(tmp_path, tiny_data))
    with pytest.raises(ConfigError, match="one per GPU"):
        device_slots(cfg, 2)  # device cpu
    with pytest.raises(ConfigError, match="needs 2 GPUs"):
        device_slots(load_config(tiny_options(tmp_path, tiny_data, device="auto")), 2)  # this machine has none
    assert device_slots(cfg, 1) == [None]


def test_mean_and_range_are_taken_where_every_run_has_a_value():
    common, mean, low, high = mean_and_range([{2: 10.0, 4: 20.0, 6: 30.0}, {2: 14.0, 4: 10.0}])
    assert common == [2, 4]
    np.testing.assert_array_equal(mean, [12.0, 15.0])
    np.testing.assert_array_equal(low, [10.0, 10.0])
    np.testing.assert_array_equal(high, [14.0, 20.0])


def sweep_command(options, *args):
    return [sys.executable, "run.py", "--opt", str(options), "--debug", "--multirun", *args]


def state_of(folder):
    return {r["name"]: r for r in json.loads((folder / SWEEP_FILE).read_text())["runs"]}


def sweep(options, *args) -> int:
    """``run.py --multirun`` in this process (its runs are processes of their own, as always)."""
    return run_main(run.main, ["--opt", str(options), "--debug", "--multirun", *args])


FAKE_RUN_OF_DATA = """
import json, os, shutil, sys
values = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[1:] if "=" in a)}
data = values["dataset.data_path"]
if not os.path.isdir(data):
    print(f"error: {data} not found", file=sys.stderr)
    sys.exit(2)
shutil.copytree(os.environ["FINISHED_RUN"], os.path.join(values["output_dir"], values["wandb.name"]))
"""


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(finished_run, tiny_data, tmp_path, monkeypatch, capsys):
    program = tmp_path / "fake_run.py"  # stands for run.py: fails as it does on missing data, else "trains" in no time
    program.write_text(FAKE_RUN_OF_DATA)
    monkeypatch.setenv("FINISHED_RUN", str(finished_run.folder))
    missing = tmp_path / "missing"
    assert run_sweep(program, str(tiny_options(tmp_path, tiny_data)), [f"dataset.data_path={missing},{tiny_data}"]) == 1
    folder = tmp_path / "output" / "tiny"
    failed = state_of(folder)[run_name([Setting("dataset.data_path", str(missing), str(missing))])]
    assert failed["status"] == "failed" and failed["exit_status"] == 2 and failed["reason"] == f"{missing} not found"
    assert [r["status"] for r in state_of(folder).values()] == ["failed", "done"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["failed"][0]["reason"] == failed["reason"]
    assert "Runs that did not finish" in (folder / "summary.md").read_text()
    assert "1 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_a_real_run_that_fails_is_recorded_and_the_sweep_goes_on(tiny_data, tmp_path, capfd):
    options = tiny_options(tmp_path, tiny_data)
    missing = tmp_path / "missing"
    assert sweep(options, f"dataset.data_path={missing},{tiny_data}") == 1
    folder = tmp_path / "output" / "tiny"
    failed = state_of(folder)[run_name([Setting("dataset.data_path", str(missing), str(missing))])]
    assert failed["status"] == "failed" and failed["exit_status"] == 2 and str(missing) in failed["reason"]
    assert [r["status"] for r in state_of(folder).values()] == ["failed", "done"]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["failed"][0]["reason"] == failed["reason"]
    assert "Runs that did not finish" in (folder / "summary.md").read_text()
    assert "1 failed" in capfd.readouterr().out


def ctrl_c_once(path: Path) -> threading.Thread:
    """A thread that sends Ctrl-C to this process's main thread once ``path`` exists."""
    def wait_then_interrupt():
        wait_for(path.exists, str(path))
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    thread = threading.Thread(target=wait_then_interrupt, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped(tiny_data, tmp_path, capfd, ctrl_c_raises):
    options = tiny_options(tmp_path, tiny_data)
    folder = tmp_path / "output" / "tiny"
    ctrl_c_once(folder / "seed=0" / "last.pth")  # the terminal's foreground group is the sweep's alone
    assert sweep(options, "seed=0,1", "train.epoch=1000") == 130
    err = capfd.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    state = state_of(folder)
    assert state["seed=0"]["status"] == "interrupted" and state["seed=1"]["status"] == "pending"

    assert sweep(options, "seed=0,1", "train.epoch=1000") == 2
    assert "pass --resume" in capfd.readouterr().err

    assert sweep(options, "seed=0,1", "train.epoch=1", "--resume") == 0
    resumed = capfd.readouterr()
    state = state_of(folder)
    assert state["seed=0"]["resumed"] and not state["seed=1"]["resumed"]
    assert {r["status"] for r in state.values()} == {"done"}
    for seed in (0, 1):  # every run in its folder, with its own options, grouped under the sweep's name
        config = json.loads((folder / f"seed={seed}" / "config.json").read_text())
        assert (config["seed"], config["wandb"]["name"], config["wandb"]["group"]) == (seed, f"seed={seed}", "tiny")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["groups"]["all runs"]["last"]["no_crf"]["Cluster_mIoU"]["n"] == 2
    assert (folder / "summary_curves.png").stat().st_size > 0 and (folder / "summary.csv").is_file()
    assert "2 of 2 runs finished" in resumed.out

    assert sweep(options, "seed=0,1", "train.epoch=1", "--resume") == 0
    finished = capfd.readouterr().out
    assert "(2 finished before)" in finished
    assert state_of(folder) == state  # how the runs ran is kept
    assert "=== sweep run" not in finished and (folder / "summary.md").is_file()


@pytest.mark.slow
def test_a_run_stops_by_itself_when_its_sweep_is_killed(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data)
    run_dir = tmp_path / "output" / "tiny" / "seed=0"
    process = subprocess.Popen(sweep_command(options, "seed=0,1", "train.epoch=1000"), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run_dir / "last.pth").exists() or process.poll() is not None, "a first checkpoint")
    (child,) = children(process.pid)
    process.kill()  # SIGKILL: the sweep cannot pass it on
    process.communicate(timeout=WAIT_S)  # ends when the run no longer writes into the sweep's pipes
    wait_for(lambda: not alive(child), "the run to stop")
    console = (run_dir / "console.log").read_text()
    assert "has ended: stopping as on SIGTERM" in console and console.strip().endswith("terminated (SIGTERM)")
    assert "Traceback" not in console
    assert load_checkpoint(run_dir / "last.pth")["iter"] > 0


FAKE_RUN = """
import os, sys, time
print(f"training from {time.time():.6f}", flush=True)
time.sleep(0.5)
print(f"until {time.time():.6f}", flush=True)
print("error: device " + os.environ["CUDA_VISIBLE_DEVICES"], file=sys.stderr)
sys.exit(3)
"""


def test_jobs_run_side_by_side_never_two_on_one_device(tiny_data, tmp_path):
    program = tmp_path / "fake_run.py"  # stands for run.py: takes half a second, says when and which GPU, fails
    program.write_text(FAKE_RUN)
    options = tiny_options(tmp_path, tiny_data)
    assert run_sweep(program, str(options), ["seed=range(0,5)"], slots=["0", "1"]) == 1
    folder = tmp_path / "output" / "tiny"
    runs = list(state_of(folder).values())
    assert [r["reason"] for r in runs] == [f"device {r['device']}" for r in runs]  # CUDA_VISIBLE_DEVICES reached it
    assert {r["device"] for r in runs} == {"0", "1"}
    alive = {}  # run -> (from, until): when its process ran, as the process itself saw the clock
    for r in runs:  # each run's output, stdout and stderr, in its folder
        console = (folder / r["name"] / CONSOLE_FILE).read_text().splitlines()
        assert [line.split()[0] for line in console[:2]] == ["training", "until"]
        assert console[2:] == [f"error: device {r['device']}"]
        alive[r["name"]] = (float(console[0].split()[-1]), float(console[1].split()[-1]))
    for a in runs:
        for b in runs:
            if a is not b and a["device"] == b["device"]:  # one run on a device at a time
                (a_from, a_until), (b_from, b_until) = alive[a["name"]], alive[b["name"]]
                assert a_until < b_from or b_until < a_from, (a, b)
    assert alive[runs[1]["name"]][0] < alive[runs[0]["name"]][1]  # two at a time: the second began before the first ended
