"""What clusters and terminals send: SIGTERM, SIGHUP, Ctrl-C to a process group, SIGKILL. Real processes here."""
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Optional

import pytest
import torch

import run
from engine.checkpoint import load_checkpoint
from tests.conftest import SHALLOW_DEPTH, TINY_COLORS, random_checkpoint, tiny_options
from tests.world import Ended, as_a_program, finish_program, fork, start_program
from utils.cli import run_main

CRF_VAL_IMAGES = 32  # enough CRF work (seconds with two workers) that a signal sent when they start finds them at it
WAIT_S = 600  # upper bound for anything to happen, however busy the machine; the tests pass in seconds


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


class Job:
    """``python {script} *args`` started from a terminal: a process group of its own, SIGHUP at its default (or
    ignored, as ``nohup`` starts it), stdout and stderr kept (tests/world.py forks it with torch imported)."""

    def __init__(self, script: str, *args: str, folder: Path, nohup: bool = False,
                 env: Optional[Mapping[str, Optional[str]]] = None) -> None:
        self.folder = folder
        (self.process,) = start_program(script, args, folder, depth=SHALLOW_DEPTH, new_session=True, nohup=nohup,
                                        env=env)
        self.pid = self.process.pid

    def end(self) -> Ended:
        """Wait for the program to end."""
        (ended,) = finish_program([self.process], self.folder)
        return ended

    def wait_for(self, condition, what: str) -> None:
        """``wait_for`` that fails at once, with the program's stderr, if the program ends first."""
        wait_for(lambda: condition() or not self.process.is_alive(), what)
        if not condition():
            raise AssertionError(f"the program ended before {what}:\n{self.end().err}")


@pytest.fixture(scope="module")
def crf_checkpoint(shallow_vit, tiny_data, tmp_path_factory):
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
def test_termination_during_crf_ends_eval_with_one_line_and_no_worker_left(crf_checkpoint, tmp_path, signum,
                                                                          to_group):
    job = Job("eval.py", "--checkpoint", str(crf_checkpoint), "--debug", "--out", str(tmp_path), folder=tmp_path)
    job.wait_for(lambda: len(crf_workers_of(job.pid)) == 2, "the CRF workers")
    workers = children(job.pid)
    os.killpg(job.pid, signum) if to_group else os.kill(job.pid, signum)
    ended = job.end()
    name = signal.Signals(signum).name
    assert ended.status == 128 + signum
    assert ended.err.strip().splitlines()[-1] == f"terminated ({name})" and "Traceback" not in ended.err, ended.err
    wait_for(lambda: not any(alive(w) for w in workers), "the workers to end")


def test_workers_end_by_themselves_when_eval_is_killed(crf_checkpoint, tmp_path):
    job = Job("eval.py", "--checkpoint", str(crf_checkpoint), "--debug", "--out", str(tmp_path), folder=tmp_path)
    job.wait_for(lambda: len(crf_workers_of(job.pid)) == 2, "the CRF workers")
    workers = children(job.pid)
    os.kill(job.pid, signal.SIGKILL)  # no handler runs, nothing is cleaned up by the dying process
    assert job.end().status == -signal.SIGKILL
    wait_for(lambda: not any(alive(w) for w in workers), "the orphaned workers to end")


@pytest.mark.parametrize("signum, status, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                  (signal.SIGHUP, 129, "terminated (SIGHUP)")])
def test_termination_during_training_exits_with_its_status_and_intact_files(tiny_data, tmp_path, signum, status,
                                                                            line):
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 1000, "valid_freq": 2})
    job = Job("run.py", "--opt", str(options), "--debug", folder=tmp_path / "console")
    last = tmp_path / "output" / "tiny" / "last.pth"
    job.wait_for(last.exists, "the first checkpoint")
    os.kill(job.pid, signum)
    ended = job.end()
    assert ended.status == status and ended.err.strip().splitlines()[-1] == line and "Traceback" not in ended.err
    assert load_checkpoint(last)["iter"] >= 2
    assert not list(last.parent.glob(".*.tmp"))


@pytest.mark.parametrize("signum, line", [(signal.SIGINT, "interrupted"),  # a terminal's Ctrl-C
                                          (signal.SIGTERM, "terminated (SIGTERM)")])  # SLURM's scancel
def test_a_signal_to_the_whole_job_with_loader_workers_prints_one_line(tiny_data, tmp_path, signum, line):
    options = tiny_options(tmp_path, tiny_data, dataloader={"num_workers": 2}, train={"epoch": 1000})
    job = Job("run.py", "--opt", str(options), "--debug", folder=tmp_path / "console")
    job.wait_for((tmp_path / "output" / "tiny" / "last.pth").exists, "the first checkpoint")
    os.killpg(job.pid, signum)  # to every process of the job: the workers get it too
    ended = job.end()
    assert ended.status == 128 + signum
    err = ended.err
    assert err.strip().splitlines()[-1] == line and "Traceback" not in err and "Exception ignored" not in err, err


def test_ctrl_c_while_a_checkpoint_is_written_takes_effect_after_it(tiny_data, tmp_path, monkeypatch, ctrl_c_raises):
    real_save = torch.save

    def interrupted_save(obj, f):  # Ctrl-C arrives in the middle of the write
        signal_this_process(signal.SIGINT)
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", interrupted_save)
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


def test_a_nohup_evaluation_and_its_crf_workers_survive_the_terminal_closing(crf_checkpoint, tmp_path):
    job = Job("eval.py", "--checkpoint", str(crf_checkpoint), "--debug", "--out", str(tmp_path), folder=tmp_path,
              nohup=True)
    job.wait_for(lambda: len(crf_workers_of(job.pid)) == 2, "the CRF workers")
    os.killpg(job.pid, signal.SIGHUP)  # the terminal closes: every process of the job gets it
    ended = job.end()
    assert ended.status == 0, ended.err
    assert json.loads((tmp_path / "eval_report.json").read_text())["crf"]  # the workers refined every map


_started = None  # released by a pool's worker when it waits for tasks or is busy (inherited when the pool forks)


def _init_and_say_so(*args) -> None:
    from dataset.crop import _init_worker

    _init_worker(*args)
    _started.release()


def five_crop_pool_waiting(ready: Path, stderr: Path) -> None:
    """A five-crop pool of two workers that wait for tasks; ``ready`` appears once both do."""
    global _started
    as_a_program(None, stderr, new_session=True)
    _started = multiprocessing.get_context().Semaphore(0)
    pool = multiprocessing.get_context().Pool(2, _init_and_say_so, (None, os.getpid()))
    for _ in range(2):
        _started.acquire()
    ready.touch()
    time.sleep(WAIT_S)
    pool.terminate()


def test_ctrl_c_to_a_five_crop_pool_prints_no_worker_traceback(tmp_path):
    process = fork(five_crop_pool_waiting, tmp_path / "ready", tmp_path / "err")
    wait_for(lambda: (tmp_path / "ready").exists() or not process.is_alive(), "both workers to wait for tasks")
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: to every process of the job
    process.join(WAIT_S)
    assert (tmp_path / "ready").exists()
    err = (tmp_path / "err").read_text()
    assert "ForkPoolWorker" not in err, err  # a worker that took Ctrl-C prints "Process ForkPoolWorker-1: Traceback"


def signal_this_process(signum: int) -> None:
    """Send ``signum`` to this process's main thread, the one that runs Python's handlers: it arrives before
    this call returns and its handler runs at the next bytecode (a signal to the process may be delivered to another
    thread, which a busy machine may not run for a while)."""
    signal.pthread_kill(threading.main_thread().ident, signum)


class _LostSignal:
    """Sends SIGTERM to this process from a finalizer: the handler's exception is raised there, where Python ignores
    exceptions, as it does while data-loader workers are forked."""

    def __del__(self):
        signal_this_process(signal.SIGTERM)


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


def fail_in_threads_of_a_worker(errors: list, log: Path) -> None:
    """A worker process (worker_process_setup) whose threads raise ``errors``, one each, in two ways: uncaught, and
    caught and reported through sys.excepthook, as multiprocessing's resource sharer reports; stderr into ``log``."""
    from utils import signals

    as_a_program(None, log)
    signals.worker_process_setup(os.getppid())

    def fail(error):
        raise error

    def report(error):
        try:
            raise error
        except BaseException:
            sys.excepthook(*sys.exc_info())

    for error in errors:
        for target in (fail, report):
            thread = threading.Thread(target=target, args=(error,))
            thread.start()
            thread.join()


def test_a_worker_is_silent_about_a_connection_its_parent_closed_and_not_about_other_errors(tmp_path):
    process = fork(fail_in_threads_of_a_worker, [BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "x"),
                                                 ValueError("a real failure")], tmp_path / "err")
    process.join(WAIT_S)
    err = (tmp_path / "err").read_text()
    assert err.count("ValueError: a real failure") == 2 and err.count("Traceback") == 2, err


def _busy(_: int) -> None:
    _started.release()
    while True:
        sum(range(1000))


def terminate_a_busy_pool(stderr: Path) -> None:
    """Terminate a five-crop pool whose two workers are busy, under the handlers a forked worker inherits (as under
    run_main)."""
    global _started
    from dataset.crop import _init_worker
    from utils import signals

    as_a_program(None, stderr, new_session=True)
    _started = multiprocessing.get_context().Semaphore(0)
    with signals.handled():
        pool = multiprocessing.get_context().Pool(2, _init_worker, (None, os.getpid()))
        pool.map_async(_busy, range(2), chunksize=1)
        for _ in range(2):
            _started.acquire()  # both workers are busy
        pool.terminate()  # SIGTERM to the busy workers, as a pool's exit sends it


def test_terminating_a_busy_forked_pool_prints_no_worker_traceback(tmp_path):
    process = fork(terminate_a_busy_pool, tmp_path / "err")
    process.join(WAIT_S)
    err = (tmp_path / "err").read_text()
    assert process.exitcode == 0 and "Traceback" not in err, err
