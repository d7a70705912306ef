"""Device and precision: resolved once from the config, then used through these helpers.

This is the only module that names CUDA devices or half-precision dtypes; the rest of the code receives a
``torch.device`` (or a Fabric, which carries it) and a precision string ("fp32", "fp16" or "bf16").

Mixed precision is plain ``torch.amp``, as DINO and MAE use it: the training and evaluation steps enter
``autocast()``, and training scales the fp16 loss with the ``GradScaler`` of ``grad_scaler()``. Lightning Fabric
places the modules on the device (and is where data-parallel training plugs in); its own precision plugins are not
used, because they update the loss scale at every optimizer step and PPAP steps three optimizers per iteration.
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager, Iterator

import torch
from lightning_fabric import Fabric

from utils.errors import ConfigError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The original training script created its fp16 GradScaler with these two settings (torch's defaults are 65536 and
# 2000); a smaller initial scale skips fewer steps at the start, and we keep both so that fp16 runs match it.
GRAD_SCALER_INIT_SCALE = 2048.0
GRAD_SCALER_GROWTH_INTERVAL = 1000
# cuBLAS repeats its results only with a fixed workspace (CUDA's documentation on cuBLAS reproducibility)
CUBLAS_WORKSPACE = ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(device: str, gpu_ids: tuple[int, ...] = (0,)) -> torch.device:
    """``auto`` -> the first of ``gpu_ids`` when CUDA is available, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", gpu_ids[0] if gpu_ids else 0)
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asks for CUDA, but no CUDA device is available (use device=auto or cpu)")
        index = resolved.index if resolved.index is not None else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp16 mixed precision on CUDA (what the paper's models were trained with), fp32 on the CPU.

    fp16 and bf16 autocast also run on the CPU: slower than fp32 there, but they exercise the mixed-precision
    path (and the fp16 loss scaling) on machines without a GPU.
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision 'bf16' is not supported by this GPU; use precision=fp16")
    return precision


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Mixed-precision context for a forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """The fp16 loss scaler with the original's settings; for fp32 and bf16 a disabled one, whose ``scale``,
    ``unscale_``, ``step`` and ``update`` pass through, so the training step is the same code in every precision."""
    return torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE,
                                growth_interval=GRAD_SCALER_GROWTH_INTERVAL, enabled=precision == "fp16")


def make_fabric(device: torch.device) -> Fabric:
    """A single-process Fabric on ``device``: ``fabric.setup_module`` moves a module there."""
    if device.type == "cuda":
        return Fabric(accelerator="cuda", devices=[device.index or 0], precision="32-true")
    return Fabric(accelerator="cpu", devices=1, precision="32-true")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``deterministic: true`` in the block: PyTorch's deterministic kernels (``torch.use_deterministic_algorithms``),
    cuDNN's deterministic convolutions and a fixed cuBLAS workspace, so that a GPU run repeats bit for bit where
    PyTorch allows; the previous settings come back afterwards. An operation without a deterministic kernel warns
    once (by name) and runs anyway rather than stopping a long run (``warn_only``); the training step avoids the one
    it would meet (``loss.probe.upsample``).

    Enter before the first CUDA operation of the process (cuBLAS reads its workspace setting when it starts)."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault(*CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]
