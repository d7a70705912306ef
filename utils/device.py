"""Device and precision: resolved once from the config, used everywhere else through these helpers.

This is the only module that names CUDA devices or half-precision dtypes; the rest of the code receives a
``torch.device`` and a precision string ("fp32", "fp16" or "bf16").
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from utils.errors import ConfigError

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
FABRIC_PRECISION = {"fp32": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
GRAD_SCALER_INIT_SCALE = 2048.0  # as the original run.py
GRAD_SCALER_GROWTH_INTERVAL = 1000  # as the original run.py


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
    """``auto`` -> fp16 mixed precision on CUDA (as the original), fp32 on the CPU."""
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise ConfigError(f"precision {precision!r} needs a CUDA device; on {device.type} use precision=fp32 (or auto)")
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision 'bf16' is not supported by this GPU; use precision=fp16")
    return precision


def autocast(device: torch.device, precision: str) -> ContextManager:
    """Mixed-precision context for a forward pass; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
