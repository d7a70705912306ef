"""Sweeps: ``run.py --multirun`` trains one run per combination of the swept values (config/overrides.py).

Every run is a run.py of its own, in its own process, so that one run that fails (diverges, meets a bad image,
runs out of memory) ends only itself: the sweep records why and goes on. The runs live in the sweep's folder
``{output_dir}/{wandb.name}/``, each in a folder named by its swept values (``seed=1,optimizer.net.lr=0.001``) with
its own config.json, and wandb groups them under the sweep's name. Runs go one after another; ``--jobs N`` runs N at
a time, each alone on its GPU (CUDA_VISIBLE_DEVICES), never two on one device.

``sweep.json`` in the sweep's folder says where every run stands (pending, running, done, failed, interrupted), with
its exit status and reason; it is rewritten whenever a run starts or ends. ``--resume`` skips the finished runs
(final_metrics.json), resumes those with a last.pth and starts the others; a run that failed before is tried again.
At the end, ``engine.report`` writes summary.md/.json/.csv and summary_curves.png over the finished runs.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) reaches the sweep alone (the runs have process groups of their own, so a
terminal does not signal them twice); the sweep passes it on to the running runs, waits until they have stopped
(their last.pth intact) and ends with the signal's status. A sweep killed outright (SIGKILL) passes nothing on: its
runs notice within a second and stop the same way, writing into their console.log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Optional, Sequence

from engine.report import find_runs, summarize, tables, write_summary
from engine.rundir import BEST, CONFIG_FILE, CONSOLE_FILE, FINAL_METRICS, LAST, SWEEP_FILE, own_folder
from utils import signals
from config import Config, load_config
from utils.distributed import detect_launch
from utils.errors import ConfigError, ExitStatus, UserError
from utils.files import to_json, write_text_atomically
from config.overrides import Setting, parse_sweep, run_name

POLL_S = 0.2  # how often the sweep looks whether a run has ended
TAIL_BYTES = 8192  # of a run's stderr, kept for the reason it failed
NOT_SWEPT = ("output_dir", "wandb.name")  # they name the sweep's folder
PARENT_ENV = "PPAP_SWEEP_PID"  # tells a run the sweep that started it (follow_sweep)


@dataclass
class SweepRun:
    """One run of a sweep and where it stands."""

    name: str  # its folder in the sweep's folder
    overrides: list[str]  # the run.py overrides that make it (key=JSON value)
    status: str = "pending"  # pending | running | done | failed | interrupted
    resumed: bool = False  # started from its last.pth
    device: Optional[str] = None  # the GPU it ran on (--jobs N)
    exit_status: Optional[int] = None
    reason: Optional[str] = None  # why it failed: its last "error:" line, or what its exit status means
    started: Optional[float] = None  # when it last started (seconds since the epoch)
    seconds: Optional[float] = None  # how long it ran then


@dataclass(frozen=True)
class Plan:
    folder: Path
    runs: list[SweepRun]
    base: Config  # the options every run shares (before its swept values)


def plan_sweep(opt: str, items: Sequence[str], data_path: Optional[str] = None) -> Plan:
    """The runs of ``items`` (overrides in Hydra's grammar); every run's options are checked before any run starts."""
    sweep = parse_sweep(items)
    if not sweep.axes:
        raise ConfigError("--multirun: nothing to sweep over; give a key several values (seed=0,1,2, "
                          "seed=range(0,5)), or leave out --multirun for one run")
    for axis in sweep.axes:
        if axis[0].key in NOT_SWEPT:
            raise ConfigError(f"--multirun: {axis[0].key} names the sweep's folder and cannot be swept")
    extra = [("dataset.data_path", data_path)] if data_path is not None else []
    base = load_config(opt, [*(s.override for s in sweep.fixed), *extra])
    folder = Path(base.output_dir) / base.wandb.name
    group = base.wandb.group or base.wandb.name
    runs, names = [], set()
    for point in sweep.points():
        name = run_name(point)
        if name in names:
            raise ConfigError(f"--multirun: the run {name} comes twice; give each value once")
        names.add(name)
        where = (Setting("output_dir", str(folder), ""), Setting("wandb.name", name, ""),
                 Setting("wandb.group", group, ""))  # its folder in the sweep's, and its wandb name and group
        overrides = [s.override for s in (*sweep.fixed, *point, *where)]
        load_config(opt, [*overrides, *extra])  # a mistake in any run's options is found before the first run
        runs.append(SweepRun(name, overrides))
    return Plan(folder, runs, base)


def device_slots(cfg: Config, jobs: int) -> list[Optional[str]]:
    """Where runs go: ``[None]`` (one at a time, on the options' device) or one GPU id per concurrent run."""
    if jobs == 1:
        return [None]
    if cfg.device not in ("auto", "cuda"):
        raise ConfigError(f"--jobs {jobs} runs {jobs} runs at once, one per GPU, and needs device auto or cuda (got "
                          f"{cfg.device!r}); on the CPU, or on one GPU, runs go one after another (leave out --jobs)")
    import torch

    available = torch.cuda.device_count()
    gpus = list(cfg.gpu_ids) if len(cfg.gpu_ids) > 1 else list(range(available))
    if len(gpus) < jobs or any(g >= available for g in gpus):
        raise ConfigError(f"--jobs {jobs}: needs {jobs} GPUs, one per run; this machine has {available}"
                          + (f" and gpu_ids names {list(cfg.gpu_ids)}" if len(cfg.gpu_ids) > 1 else ""))
    return [str(g) for g in gpus[:jobs]]


def run_sweep(program: Path, opt: str, items: Sequence[str], *, data_path: Optional[str] = None, debug: bool = False,
              resume: bool = False, jobs: int = 1, slots: Optional[list[Optional[str]]] = None) -> int:
    """Run the sweep; 0 when every run finished, 1 when one failed. ``program`` is run.py; ``slots`` (default: from
    ``jobs``) the devices of ``device_slots``."""
    launch = detect_launch()
    if launch.world_size > 1:
        raise ConfigError(f"--multirun under {launch.launcher}: start the sweep as one process (python run.py "
                          f"--multirun ...); --jobs N runs N runs at once, one per GPU")
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1 (got {jobs})")
    plan = plan_sweep(opt, items, data_path)
    slots = slots if slots is not None else device_slots(plan.base, jobs)
    lock = own_folder(plan.folder, "sweep")
    try:
        _check_folder(plan, resume)
        before = _previous_state(plan.folder) if resume else {}
        for run in plan.runs:
            if resume and (plan.folder / run.name / FINAL_METRICS).is_file():
                record = before.get(run.name, {})
                for key in ("resumed", "device", "exit_status", "started", "seconds"):  # how it ran, when it ran
                    setattr(run, key, record.get(key))
                run.status, run.reason = "done", None
        state = _State(plan, opt, items)
        todo = [run for run in plan.runs if run.status != "done"]
        print(f"sweep of {len(plan.runs)} runs into {plan.folder}"
              + (f" ({len(plan.runs) - len(todo)} finished before)" if len(todo) < len(plan.runs) else "")
              + (f", {len(slots)} at a time" if len(slots) > 1 else ""), flush=True)
        state.write()
        args = [sys.executable, str(program), "--opt", opt, *(["--debug"] if debug else []),
                *(["--data_path", data_path] if data_path is not None else [])]
        _execute(todo, plan.folder, args, slots, state)
        return _finish(plan)
    finally:
        lock.release()


def _check_folder(plan: Plan, resume: bool) -> None:
    for name in (LAST, BEST, CONFIG_FILE):
        if (plan.folder / name).exists():
            raise UserError(f"{plan.folder} holds a single run ({name}); a sweep needs a folder of its own: choose "
                            f"another wandb.name or output_dir")
    if resume:
        return
    started = (plan.folder / SWEEP_FILE).exists() or any((plan.folder / run.name / LAST).exists() for run in plan.runs)
    if started:
        raise UserError(f"{plan.folder} already holds this sweep's runs; pass --resume to continue it (finished runs "
                        f"are skipped), or choose another wandb.name or output_dir")


def _previous_state(folder: Path) -> dict[str, dict]:
    """The runs recorded in an earlier sweep.json, by name (none if it is missing or unreadable)."""
    try:
        runs = json.loads((folder / SWEEP_FILE).read_text(encoding="utf-8"))["runs"]
        return {r["name"]: r for r in runs if isinstance(r, dict) and "name" in r}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class _State:
    """sweep.json: the command and every run's state, rewritten whenever a run starts or ends."""

    def __init__(self, plan: Plan, opt: str, items: Sequence[str]) -> None:
        self.plan, self.opt, self.items = plan, opt, list(items)

    def write(self) -> None:
        state = {"opt": self.opt, "overrides": self.items, "runs": [asdict(run) for run in self.plan.runs]}
        write_text_atomically(self.plan.folder / SWEEP_FILE, to_json(state, indent=2) + "\n")


class _Running:
    """A started run: its process, and a thread that passes its stderr on and keeps the end of it."""

    def __init__(self, run: SweepRun, command: list[str], env: dict[str, str], out: Optional[IO[bytes]]) -> None:
        self.run, self.out, self.started = run, out, time.monotonic()
        # a process group of its own: a terminal's Ctrl-C reaches only the sweep, which passes it on once
        self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.PIPE, process_group=0)
        self.tail = b""
        self.reader = threading.Thread(target=self._copy_stderr, daemon=True)
        self.reader.start()

    def _copy_stderr(self) -> None:
        assert self.process.stderr is not None
        fd = self.process.stderr.fileno()
        while chunk := os.read(fd, 65536):
            self.tail = (self.tail + chunk)[-TAIL_BYTES:]
            if self.out is not None:
                self.out.write(chunk)
                self.out.flush()
            else:
                _write_stderr(chunk)

    def reason(self, status: int) -> Optional[str]:
        if status == ExitStatus.OK:
            return None
        errors = [line for line in self.tail.decode("utf-8", "replace").splitlines() if line.startswith("error: ")]
        if errors:
            return errors[-1][len("error: "):]
        if status < 0:
            return f"killed by {signal.Signals(-status).name}"
        if status > 128 and status - 128 in signal.valid_signals():
            return f"stopped by {signal.Signals(status - 128).name}"
        return {ExitStatus.FAILED: "training diverged",
                ExitStatus.USER_ERROR: "a mistake in its options, data or files"}.get(status, f"exit status {status}")


def _write_stderr(chunk: bytes) -> None:
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is not None:
        buffer.write(chunk)
        buffer.flush()
    else:  # a replaced sys.stderr (a test's capture)
        sys.stderr.write(chunk.decode("utf-8", "replace"))


def _execute(todo: list[SweepRun], folder: Path, args: list[str], slots: list[Optional[str]], state: _State) -> None:
    pending: deque[SweepRun] = deque(todo)
    active: dict[Optional[str], _Running] = {}
    total, started = len(todo), 0
    try:
        while pending or active:
            for slot in slots:
                if slot in active or not pending:
                    continue
                run = pending.popleft()
                started += 1
                with signals.deferred():  # a stop signal finds the run registered, and passes it on
                    active[slot] = _start(run, folder, args, slot, f"{started}/{total}")
                state.write()
            time.sleep(POLL_S)
            signals.check()
            for slot, running in list(active.items()):
                status = running.process.poll()
                if status is not None:
                    _ended(running, status)
                    del active[slot]
                    state.write()
    except KeyboardInterrupt as err:
        _stop_all(list(active.values()), signals.signal_of(err))
        state.write()
        raise


def _start(run: SweepRun, folder: Path, args: list[str], slot: Optional[str], count: str) -> _Running:
    run_dir = folder / run.name
    run.resumed = (run_dir / LAST).is_file()
    run.status, run.device, run.exit_status, run.reason = "running", slot, None, None
    run.started, run.seconds = round(time.time(), 3), None
    env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
    overrides = list(run.overrides)
    out = None
    if slot is not None:  # the run sees one GPU, its own, as its first device
        env["CUDA_VISIBLE_DEVICES"] = slot
        overrides.append("gpu_ids=[0]")
        run_dir.mkdir(parents=True, exist_ok=True)
        out = (run_dir / CONSOLE_FILE).open("ab")
    print(f"\n=== sweep run {count}: {run.name}" + (" (resumed from its last.pth)" if run.resumed else "")
          + (f" on GPU {slot}, output in {run_dir / CONSOLE_FILE}" if slot is not None else "") + " ===", flush=True)
    return _Running(run, [*args, *(["--resume"] if run.resumed else []), *overrides], env, out)


def follow_sweep(run_dir: Path) -> None:
    """In a run that a sweep started: stop it (last.pth intact) if the sweep is killed with a signal it cannot pass
    on (SIGKILL, the OOM killer), its output from then on in console.log, rather than leave it training alone."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is not None and parent.isdigit():
        signals.stop_with_parent(int(parent), run_dir / CONSOLE_FILE)


def _ended(running: _Running, status: int) -> None:
    running.reader.join()
    if running.out is not None:
        running.out.close()
    run = running.run
    run.exit_status, run.seconds = status, round(time.monotonic() - running.started, 1)
    run.status = "done" if status == ExitStatus.OK else "failed"
    run.reason = running.reason(status)
    print(f"=== sweep run {run.name}: " + ("done" if status == ExitStatus.OK else f"FAILED ({run.reason})")
          + f" after {_duration(run.seconds)} ===", flush=True)


def _stop_all(running: list[_Running], signum: int) -> None:
    """Pass ``signum`` on to the running runs and wait until they have stopped (a further signal is passed on too)."""
    for r in running:
        r.process.send_signal(signum)
    while running:
        try:
            for r in running:
                r.process.wait()
                r.reader.join()
            break
        except KeyboardInterrupt as err:
            for r in running:
                if r.process.poll() is None:
                    r.process.send_signal(signals.signal_of(err))
    for r in running:
        if r.out is not None:
            r.out.close()
        r.run.status, r.run.exit_status = "interrupted", r.process.returncode
        r.run.seconds = round(time.monotonic() - r.started, 1)
    print("sweep stopped; continue it with the same command and --resume", file=sys.stderr, flush=True)


def _finish(plan: Plan) -> int:
    done = [run for run in plan.runs if run.status == "done"]
    failed = [(run.name, run.reason or "") for run in plan.runs if run.status == "failed"]
    print(f"\nsweep {plan.folder}: {len(done)} of {len(plan.runs)} runs finished"
          + (f", {len(failed)} failed:" if failed else ""))
    for name, reason in failed:
        print(f"  {name}: {reason}")
    if done:
        runs = find_runs([str(plan.folder / run.name) for run in done])
        paths = write_summary(runs, plan.folder, failed)
        print(tables(runs, summarize(runs)))
        for path in paths:
            print(f"wrote {path}")
    return ExitStatus.FAILED if failed else ExitStatus.OK


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
