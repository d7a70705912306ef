"""Run a function, or a whole program (run.py, eval.py), in N processes that form a gloo process group on this
machine, with the environment torchrun or srun gives them.

The processes are forked from a forkserver that imported torch, Lightning Fabric and the engine once for the whole
test session: a world starts in a fraction of a second instead of the seconds each process would spend importing
them. Each process gets its launcher's variables when it starts; the forkserver's own environment is the test
process's at the moment the first world started.
"""
from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import signal
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
WORLD_TIMEOUT_S = 600  # bound of one world's work on a busy machine; the tests' worlds take seconds
WANDB_SERVICE_ENV = "WANDB_SERVICE"
# imported once, by the forkserver, for every process of every world
PRELOAD = ("torch", "lightning_fabric", "utils.distributed", "utils.cli", "engine.train", "engine.evaluate", "loss",
           "model", "dataset", "run", "eval")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for process ``rank`` of ``size`` on one machine."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size), "LOCAL_WORLD_SIZE": str(size), "GROUP_RANK": "0",
            "TORCHELASTIC_RUN_ID": "test", "OMP_NUM_THREADS": "1"}


def srun_env(rank: int, size: int, port: int) -> dict[str, str]:
    """The variables SLURM's srun sets for task ``rank`` of ``size`` on one node (the port pinned for the test)."""
    return {"SLURM_NTASKS": str(size), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": str(size), "SLURM_NODELIST": "localhost",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "test", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


LAUNCHERS = {"torchrun": torchrun_env, "srun": srun_env}


@functools.lru_cache(maxsize=1)
def _context() -> multiprocessing.context.ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    # the forkserver imports the project as the tests do (Python 3.11 does not pass it the tests' sys.path)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), before) if p)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    return ctx


def _become(rank: int, size: int, port: int, launcher: str) -> None:
    """This process as the launcher would have started it: its variables, one thread (torchrun's default)."""
    for name in [k for k in os.environ if k.startswith("SLURM_")]:  # the tests may run inside a SLURM job
        del os.environ[name]
    os.environ.update(LAUNCHERS[launcher](rank, size, port))
    import torch

    torch.set_num_threads(1)


def fork(fn: Callable, *args: Any) -> multiprocessing.Process:
    """A started process that runs ``fn(*args)`` (importable, picklable arguments), forked from the forkserver."""
    process = _context().Process(target=fn, args=args)
    process.start()
    return process


def _function_child(fn: Callable, rank: int, size: int, port: int, args: tuple, results, launcher: str) -> None:
    _become(rank, size, port, launcher)
    try:
        from utils.distributed import World, launch

        # plain pickle: the queue's own would share tensors by a handle that dies with this process
        results.put((rank, "ok", pickle.dumps(fn(World(launch("cpu", [0])), *args))))
    except BaseException:  # the parent raises it with the child's traceback
        results.put((rank, "error", traceback.format_exc()))


def run_in_world(fn: Callable, size: int, *args: Any, launcher: str = "torchrun") -> list[Any]:
    """``fn(world, *args)`` in ``size`` processes (gloo, CPU) with the environment ``launcher`` ("torchrun" or
    "srun") gives them; returns the results in rank order.

    ``fn`` must be importable (a module-level function) and its arguments and result picklable."""
    ctx = _context()
    results, port = ctx.Queue(), free_port()
    processes = [ctx.Process(target=_function_child, args=(fn, rank, size, port, args, results, launcher))
                 for rank in range(size)]
    for p in processes:
        p.start()
    try:
        out = dict()
        for _ in range(size):
            rank, status, value = results.get(timeout=WORLD_TIMEOUT_S)
            if status == "error":
                raise AssertionError(f"process {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
        return [out[rank] for rank in range(size)]
    finally:
        _end(processes)


@dataclass(frozen=True)
class Ended:
    """How one process of a program ended: its exit status and what it wrote to stdout and stderr."""

    status: Optional[int]
    out: str
    err: str


def as_a_program(out: Optional[Path], err: Path, new_session: bool = False, nohup: bool = False) -> None:
    """Make this forked process what ``python PROGRAM`` started from a terminal would be: stdout into ``out`` (kept
    if None) and stderr into ``err``; no wandb service of a parent (wandb names its service to the processes a
    process starts, and the forkserver's environment is the test process's when the first world started); pools and
    data loaders forking with python's default start method (this process inherited the forkserver's); Ctrl-C raising
    KeyboardInterrupt and SIGHUP at its default, or ignored as ``nohup`` starts a program (whatever the test process
    was started with: a shell ignores SIGINT in the background jobs it starts, and its children inherit that);
    ``new_session``: a session (and process group) of its own, as subprocess.Popen(start_new_session=True) starts it,
    to be signalled as a job."""
    os.environ.pop(WANDB_SERVICE_ENV, None)
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    if new_session:
        os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)
    for fd, path in ((1, out), (2, err)):
        if path is not None:
            file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(file, fd)
            os.close(file)


def _program_child(script: str, argv: Sequence[str], rank: int, size: int, port: int, launcher: Optional[str],
                   outputs: Path, depth: Optional[int], new_session: bool, nohup: bool,
                   env: Mapping[str, Optional[str]]) -> None:
    as_a_program(outputs / f"{rank}.out", outputs / f"{rank}.err", new_session, nohup)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if launcher is not None:
        _become(rank, size, port, launcher)
    if depth is not None:  # the tests' shallow ViTs (conftest.shallow_vit)
        import model.ppap
        from model.vit import vit

        model.ppap.vit = functools.partial(vit, depth=depth)
    import runpy

    sys.argv = [script, *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")  # as python runs it; its sys.exit ends this process


def start_program(script: str, argv: Sequence[str], outputs: Path, size: int = 1, launcher: str = "torchrun",
                  depth: Optional[int] = None, new_session: bool = False, nohup: bool = False,
                  env: Optional[Mapping[str, Optional[str]]] = None) -> list[multiprocessing.Process]:
    """``python {script} *argv`` (``script`` relative to the project's root, e.g. "run.py"), as one process or as
    ``size`` processes of one launch (``launcher``'s variables, a fresh port); process r writes its stdout and stderr
    into ``outputs/r.out`` and ``outputs/r.err``. ``depth``: the ViTs' depth, as the ``shallow_vit`` fixture sets it;
    ``new_session``: each in a session (and process group) of its own; ``nohup``: SIGHUP ignored, as ``nohup`` starts
    a program; ``env``: environment variables to set (None: to remove). Returns the processes in rank order."""
    ctx, port = _context(), free_port()
    outputs.mkdir(parents=True, exist_ok=True)
    processes = [ctx.Process(target=_program_child, args=(script, argv, rank, size, port,
                                                          launcher if size > 1 else None, outputs, depth,
                                                          new_session, nohup, dict(env or {})))
                 for rank in range(size)]
    for p in processes:
        p.start()
    return processes


def finish_program(processes: list[multiprocessing.Process], outputs: Path) -> list[Ended]:
    """Wait for the processes of ``start_program`` to end; how each ended, in rank order."""
    try:
        for p in processes:
            p.join(timeout=WORLD_TIMEOUT_S)
    finally:
        _end(processes)
    return [Ended(p.exitcode, (outputs / f"{rank}.out").read_text(), (outputs / f"{rank}.err").read_text())
            for rank, p in enumerate(processes)]


def run_program(script: str, argv: Sequence[str], outputs: Path, size: int = 1, launcher: str = "torchrun",
                depth: Optional[int] = None) -> list[Ended]:
    """``start_program`` and ``finish_program``."""
    return finish_program(start_program(script, argv, outputs, size, launcher, depth), outputs)


def _end(processes: list[multiprocessing.Process]) -> None:
    for p in processes:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
            p.join()
