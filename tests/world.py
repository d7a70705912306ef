"""Run a function in N processes that form a gloo process group on this machine, as torchrun would start them."""
from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import traceback
from typing import Any, Callable

WORLD_TIMEOUT_S = 120


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


def _child(fn: Callable, rank: int, size: int, port: int, args: tuple, results, launcher: str) -> None:
    for name in [k for k in os.environ if k.startswith("SLURM_")]:  # the tests may run inside a SLURM job
        del os.environ[name]
    os.environ.update(LAUNCHERS[launcher](rank, size, port))
    try:
        import torch

        torch.set_num_threads(1)
        from utils.distributed import World, launch

        # plain pickle: the queue's own would share tensors by a handle that dies with this process
        results.put((rank, "ok", pickle.dumps(fn(World(launch("cpu", [0])), *args))))
    except BaseException:  # the parent raises it with the child's traceback
        results.put((rank, "error", traceback.format_exc()))


def run_in_world(fn: Callable, size: int, *args: Any, launcher: str = "torchrun") -> list[Any]:
    """``fn(world, *args)`` in ``size`` spawned processes (gloo, CPU) with the environment ``launcher`` ("torchrun"
    or "srun") gives them; returns the results in rank order.

    ``fn`` must be importable (a module-level function) and its arguments and result picklable."""
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    processes = [ctx.Process(target=_child, args=(fn, rank, size, port, args, results, launcher)) for rank in range(size)]
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
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
