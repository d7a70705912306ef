"""Data-parallel processes: how the program was launched, which process this is, and the collectives the engine uses.

A run is one process (``python run.py ...``) or several started by a launcher: ``torchrun`` (one machine or many)
or SLURM's ``srun`` with one task per GPU. ``launch()`` reads the launcher's environment and returns a Lightning
Fabric: single-process, or the DDP strategy (gloo on the CPU, NCCL on CUDA) whose process group it has joined.
Fabric then does the rest through its public API: the cluster environment (torchrun's or SLURM's variables, the
rendezvous address), the device of each process, DDP for the trained modules and the collectives below.

``World`` is what the engine and the loss see of it: the rank and number of processes, a gather along the first
dimension (differentiable on request), a sum, a barrier, the share of a range that is this process's, and
``agree()``, which turns a user error found by any process into the same error on every process, so that all of
them end with status 2 and the message is printed once (by process 0). With one process each of these is the
identity, and no collective is ever called.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar

from utils.errors import ConfigError, UserError, describe_os_error, one_line

if TYPE_CHECKING:  # torch and Fabric load when used: the entry points read the launch before they import them
    from lightning_fabric import Fabric
    from torch import Tensor

log = logging.getLogger(__name__)

T = TypeVar("T")
# srun in an interactive allocation (salloc, srun --pty bash) runs a shell, not our tasks: Fabric ignores SLURM there
SLURM_INTERACTIVE_NAMES = ("bash", "interactive")
# torch.distributed.nn.functional.all_gather, which Fabric's differentiable gather calls, warns that it is
# deprecated in favour of a private API; the function works and is what Fabric's public all_gather offers.
GATHER_DEPRECATION = ".*torch.distributed.nn.functional.all_gather is deprecated.*"


class ReportedByMain(UserError):
    """The user error that another process found and that process 0 reports; this process says nothing more."""


@dataclass(frozen=True)
class Launch:
    """How many processes run the program, and who started them."""

    world_size: int = 1
    local_world_size: int = 1  # processes on this machine
    num_nodes: int = 1
    launcher: Optional[str] = None  # "torchrun" | "srun" | None (a single process)

    @property
    def rank(self) -> int:
        if self.launcher == "srun":
            return int(os.environ.get("SLURM_PROCID", 0))
        return int(os.environ.get("RANK", 0))


def detect_launch() -> Launch:
    """The launch this process is part of, from the launcher's environment variables."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or ("WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env):
        world, local = int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_WORLD_SIZE", 1))
        return Launch(world, local, max(1, world // max(local, 1)), "torchrun") if world > 1 else Launch()
    world = int(env.get("SLURM_NTASKS", 1))
    if world > 1 and env.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE_NAMES:
        nodes = int(env.get("SLURM_NNODES", 1))
        return Launch(world, world // nodes, nodes, "srun")
    return Launch()


def process_rank() -> int:
    """This process's rank (0 without a launcher), from the environment: usable before Fabric starts."""
    return detect_launch().rank


def group_formed() -> bool:
    """Whether this process has joined the run's process group (``launch()`` with several processes)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def local_world_size() -> int:
    """Processes of this run on this machine (they share its cores)."""
    return detect_launch().local_world_size


def launch(device: str, gpu_ids: Sequence[int]) -> Fabric:
    """A Fabric for this process, on the device the options and the launch give it, its process group joined.

    One process: ``device`` as ``utils.device.resolve_device`` resolves it. Several: every process takes its own
    device: a CUDA device (``device`` auto or cuda) chosen by the local rank among ``gpu_ids`` when they list one
    per local process, else among the visible GPUs; or the CPU (``device`` cpu, or auto without CUDA).
    """
    import torch
    from lightning_fabric import Fabric

    from utils.device import make_fabric, resolve_device

    # Fabric sets its logger to INFO when imported and prints a banner per process as it joins the process group;
    # run.py says it in one line
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    spec = detect_launch()
    if spec.world_size == 1:
        resolved = resolve_device(device, gpu_ids)
        if resolved.type == "cuda" and len(gpu_ids) > 1:
            log.warning("gpu_ids lists %d GPUs, but this is one process, on %s: to train on all of them, start one "
                        "process per GPU with torchrun --nproc_per_node=%d", len(gpu_ids), resolved, len(gpu_ids))
        return make_fabric(resolved)
    cuda = device != "cpu" and (device.startswith("cuda") or torch.cuda.is_available())
    if cuda:
        if device not in ("auto", "cuda"):
            raise ConfigError(f"device {device!r} names one GPU, but {spec.launcher} starts {spec.world_size} "
                              f"processes, each on its own GPU: use device=cuda (or auto)")
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asks for CUDA, but no CUDA device is available (use device=cpu)")
        if len(gpu_ids) == spec.local_world_size:
            devices = list(gpu_ids)
        elif spec.local_world_size <= torch.cuda.device_count():
            devices = list(range(spec.local_world_size))
        else:
            raise ConfigError(f"{spec.launcher} starts {spec.local_world_size} processes on this machine, but "
                              f"{torch.cuda.device_count()} CUDA device(s) are visible")
        fabric = Fabric(accelerator="cuda", strategy="ddp", devices=devices, num_nodes=spec.num_nodes,
                        precision="32-true")
    else:
        fabric = Fabric(accelerator="cpu", strategy="ddp", devices=spec.local_world_size, num_nodes=spec.num_nodes,
                        precision="32-true")
    fabric.launch()  # the launcher started the processes: this joins the process group
    return fabric


class World:
    """This process among the run's processes, and the collectives of the engine (no-ops for one process)."""

    def __init__(self, fabric: Optional[Fabric] = None) -> None:
        self.fabric = fabric
        self.rank = fabric.global_rank if fabric is not None else 0
        self.size = fabric.world_size if fabric is not None else 1

    @property
    def is_main(self) -> bool:
        """Process 0: the one that owns the run directory, writes files, prints and logs to wandb."""
        return self.rank == 0

    def share(self, n: int) -> range:
        """This process's contiguous part of ``range(n)``: the parts of all processes cover it once, in rank
        order, and differ in length by at most one."""
        return range(self.rank * n // self.size, (self.rank + 1) * n // self.size)

    def gather(self, x: Tensor, grad: bool = False) -> Tensor:
        """The ``x`` of every process (same shape everywhere), concatenated along dimension 0 in rank order.

        ``grad``: the result is differentiable; the gradient that reaches this process's ``x`` is the sum of the
        gradients that every process's result received for its rows.
        """
        if self.size == 1:
            return x
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=GATHER_DEPRECATION)
            gathered = self.fabric.all_gather(x, sync_grads=grad)
        return gathered.reshape(-1, *x.shape[1:])

    def sum(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the processes (not differentiable)."""
        if self.size == 1:
            return x
        return self.fabric.all_reduce(x.detach().clone(), reduce_op="sum")

    def barrier(self) -> None:
        if self.size > 1:
            self.fabric.barrier()

    def agree(self, step: Callable[[], T]) -> T:
        """Run ``step`` on every process; if it raises a ``UserError`` (or an ``OSError``) on any of them, raise it
        on all: the first failing process's error on process 0, which prints it, and ``ReportedByMain`` elsewhere.

        ``step`` must not call collectives: a process that failed early would not call them."""
        if self.size == 1:
            return step()
        result, error = None, None
        try:
            result = step()
        except (UserError, OSError) as err:
            error = err
        import torch.distributed

        errors = [None] * self.size
        torch.distributed.all_gather_object(errors, None if error is None else _message(error))
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if not failed:
            return result
        if self.is_main:
            if error is not None:
                raise error
            rank, message = failed[0]
            raise UserError(f"process {rank}: {message}")
        raise ReportedByMain(failed[0][1]) from error


# What gloo says when the other end of a connection is gone: its process ended (killed, out of memory, crashed)
PEER_LOST_MARKS = ("Connection closed by peer", "Connection reset by peer", "remote worker")


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of the run has ended: torch's distributed
    errors (NCCL, the rendezvous store), and gloo's, which torch raises as a plain RuntimeError."""
    if not group_formed() or not isinstance(err, RuntimeError):
        return False
    import torch.distributed

    return isinstance(err, torch.distributed.DistError) or any(mark in str(err) for mark in PEER_LOST_MARKS)


def _message(err: BaseException) -> str:
    return describe_os_error(err) if isinstance(err, OSError) else one_line(err)


ONE_PROCESS = World()
