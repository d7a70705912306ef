"""What clusters and terminals send: SIGTERM, SIGHUP, Ctrl-C to a process group, SIGKILL. Real processes here."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run
from engine.checkpoint import load_checkpoint
from tests.conftest import ROOT, TINY_COLORS, random_checkpoint, tiny_options
from utils.cli import run_main

CRF_VAL_IMAGES = 32  # enough CRF work (about 5 s with two workers) to be interrupted in the middle of it
WAIT_S = 60  # upper bound for anything to happen; the tests pass in seconds


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for(condition, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def as_in_a_terminal() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # the tests may run under nohup, whose SIG_IGN is inherited


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=as_in_a_terminal)


@pytest.fixture(scope="module")
def crf_checkpoint(tiny_data, tmp_path_factory):
    """A checkpoint carrying its options, and a validation set large enough for seconds of CRF work."""
    from PIL import Image
    import numpy as np

    root = tmp_path_factory.mktemp("crf_data")
    for kind in ("imgs", "labels"):
        (root / kind).mkdir()
        (root / kind / "train").symlink_to(tiny_data / kind / "train", target_is_directory=True)
        (root / kind / "val").mkdir()
    rng = np.random.default_rng(1)
    for i in range(CRF_VAL_IMAGES):
        label = np.zeros((48, 64), np.uint8)
        label[:, 32:] = 1
        image = TINY_COLORS[label] + rng.normal(0, 12, (48, 64, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "imgs" / "val" / f"{i:03d}.png")
        Image.fromarray(label).save(root / "labels" / "val" / f"{i:03d}.png")
    folder = tmp_path_factory.mktemp("crf_run")
    return random_checkpoint(tiny_options(folder, root, eval={"is_crf": True, "crf_workers": 2}), folder / "last.pth")


def crf_workers_of(pid: int) -> list[int]:
    return [c for c in children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False),  # kill, timeout
                                             (signal.SIGHUP, True)])  # the terminal closes: the whole job
def test_termination_during_crf_ends_eval_with_one_line_and_no_worker_left(crf_checkpoint, signum, to_group):
    process = start("eval.py", "--checkpoint", str(crf_checkpoint), "--debug")
    wait_for(lambda: len(crf_workers_of(process.pid)) == 2, "the CRF workers")
    workers = children(process.pid)
    time.sleep(1.0)  # the pool is at work
    os.killpg(process.pid, signum) if to_group else process.send_signal(signum)
    _, err = process.communicate(timeout=WAIT_S)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == f"terminated ({name})" and "Traceback" not in err, err
    wait_for(lambda: not any(alive(w) for w in workers), "the workers to end", timeout=5)


def test_workers_end_by_themselves_when_eval_is_killed(crf_checkpoint):
    process = start("eval.py", "--checkpoint", str(crf_checkpoint), "--debug")
    wait_for(lambda: len(crf_workers_of(process.pid)) == 2, "the CRF workers")
    workers = children(process.pid)
    process.kill()  # SIGKILL: no handler runs, nothing is cleaned up by the dying process
    process.communicate(timeout=WAIT_S)
    wait_for(lambda: not any(alive(w) for w in workers), "the orphaned workers to end", timeout=5)


@pytest.mark.parametrize("signum, status, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                  (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_termination_during_training_exits_with_its_status_and_intact_files(tiny_data, tmp_path, signum, status,
                                                                            line):
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 1000, "valid_freq": 2})
    process = start("run.py", "--opt", str(options), "--debug")
    last = tmp_path / "output" / "tiny" / "last.pth"
    wait_for(last.exists, "the first checkpoint")
    process.send_signal(signum)
    _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == status and err.strip().splitlines()[-1] == line and "Traceback" not in err
    assert load_checkpoint(last)["iter"] >= 2
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.parametrize("signum, line", [(signal.SIGINT, "interrupted"),  # a terminal's Ctrl-C
                                          (signal.SIGTERM, "terminated (SIGTERM)")])  # SLURM's scancel
def test_a_signal_to_the_whole_job_with_loader_workers_prints_one_line(tiny_data, tmp_path, signum, line):
    options = tiny_options(tmp_path, tiny_data, dataloader={"num_workers": 2}, train={"epoch": 1000})
    process = start("run.py", "--opt", str(options), "--debug")
    wait_for((tmp_path / "output" / "tiny" / "last.pth").exists, "the first checkpoint")
    os.killpg(process.pid, signum)  # to every process of the job: the workers get it too
    _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 128 + signum
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err and "Exception ignored" not in err, err


def test_ctrl_c_while_a_checkpoint_is_written_takes_effect_after_it(tiny_data, tmp_path, monkeypatch):
    import utils.files

    real_save = torch.save

    def interrupted_save(obj, f):  # Ctrl-C arrives in the middle of the write
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        real_save(obj, f)

    monkeypatch.setattr(utils.files.torch, "save", interrupted_save)
    options = tiny_options(tmp_path, tiny_data, train={"valid_freq": 2})
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 130
    run_dir = tmp_path / "output" / "tiny"  # the interrupt came while best.pth, the first checkpoint, was written
    assert load_checkpoint(run_dir / "best.pth")["iter"] == load_checkpoint(run_dir / "last.pth")["iter"] == 2
    assert not list(run_dir.glob(".*.tmp"))  # complete: the interrupt took effect once both were written


def test_a_nohup_run_keeps_ignoring_sighup():
    import utils.signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with utils.signals.handled():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored afterwards
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_nohup_evaluation_and_its_crf_workers_survive_the_terminal_closing(crf_checkpoint):
    process = subprocess.Popen([sys.executable, "eval.py", "--checkpoint", str(crf_checkpoint), "--debug"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    wait_for(lambda: len(crf_workers_of(process.pid)) == 2, "the CRF workers")
    time.sleep(1.0)  # the pool is at work
    os.killpg(process.pid, signal.SIGHUP)  # the terminal closes: every process of the job gets it
    _, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, err


def test_ctrl_c_to_a_five_crop_pool_prints_no_worker_traceback():
    script = ("import multiprocessing, os, time\n"
              "from dataset.crop import _init_worker\n"
              "pool = multiprocessing.get_context().Pool(2, _init_worker, (None, os.getpid()))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    process.stdout.readline()
    time.sleep(0.5)  # the workers wait for tasks
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=WAIT_S)
    assert "ForkPoolWorker" not in err  # a worker that took Ctrl-C prints "Process ForkPoolWorker-1: Traceback"


class _LostSignal:
    """Sends SIGTERM to this process from a finalizer: the handler's exception is raised there, where Python ignores
    exceptions, as it does while data-loader workers are forked."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # bytecodes for the handler to run on, still inside the finalizer
            pass


def test_a_stop_signal_whose_exception_was_lost_still_stops_training(tiny_data, tmp_path, monkeypatch, capsys):
    from dataset import EpochSampler

    original_iter = EpochSampler.__iter__

    def iter_with_a_lost_signal(self):
        _LostSignal()  # made and finalized at once
        return original_iter(self)

    monkeypatch.setattr(EpochSampler, "__iter__", iter_with_a_lost_signal)
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 3})
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM)" and "Exception ignored" not in err


def test_terminating_a_busy_forked_pool_prints_no_worker_traceback():
    script = ("import multiprocessing, os, time\n"
              "from dataset.crop import _init_worker\n"
              "from utils import signals\n"
              "def busy(i):\n"
              "    end = time.time() + 3\n"
              "    while time.time() < end:\n"
              "        sum(range(1000))\n"
              "with signals.handled():  # the handlers a forked worker inherits, as under run_main\n"
              "    pool = multiprocessing.get_context().Pool(2, _init_worker, (None, os.getpid()))\n"
              "    pool.map_async(busy, range(4))\n"
              "    time.sleep(0.7)\n"
              "    pool.terminate()  # SIGTERM to the busy workers, as a pool's exit sends it\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
