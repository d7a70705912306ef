"""Device and precision: resolved once from the config, used everywhere else through these helpers.

This is the only module that names CUDA devices or half-precision dtypes; the rest of the code receives a
``torch.device`` and a precision string ("fp32", "fp16" or "bf16").
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

import torch
from lightning_fabric import Fabric
from lightning_fabric.plugins.precision.amp import MixedPrecision

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


class _OncePerIterationScaling(MixedPrecision):
    """Fabric's MixedPrecision, except that a step does not update the loss scale.

    Fabric updates the GradScaler after every optimizer step. With one optimizer per part (network, linear probe,
    cluster probe) that updates the scale three times per iteration, and the later optimizers unscale their
    gradients with a scale that may already have changed. As the original training loop, and as PyTorch's AMP
    notes prescribe for several optimizers, we step all of them and then call ``update_scale()`` once.
    """

    def optimizer_step(self, optimizer, **kwargs):
        if self.scaler is None:
            return super().optimizer_step(optimizer, **kwargs)
        return self.scaler.step(optimizer, **kwargs)

    def update_scale(self) -> None:
        if self.scaler is not None:
            self.scaler.update()


def make_fabric(device: torch.device, precision: str) -> Fabric:
    """A single-device Fabric for ``device`` and ``precision``; fp16 uses the original's GradScaler settings."""
    accelerator, devices = ("cuda", [device.index or 0]) if device.type == "cuda" else (device.type, 1)
    plugins = []
    if precision != "fp32":
        scaler = None
        if precision == "fp16":
            scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE,
                                          growth_interval=GRAD_SCALER_GROWTH_INTERVAL)
        plugins.append(_OncePerIterationScaling(FABRIC_PRECISION[precision], device.type, scaler=scaler))
    fabric = Fabric(accelerator=accelerator, devices=devices, precision=None if plugins else FABRIC_PRECISION[precision],
                    plugins=plugins or None)
    return fabric


def _plugin(fabric: Fabric):
    return fabric._precision  # noqa: SLF001 - Fabric exposes its precision plugin only privately


def update_scale(fabric: Fabric) -> None:
    """Update the fp16 loss scale once per iteration, after every optimizer has stepped (no-op otherwise)."""
    plugin = _plugin(fabric)
    if isinstance(plugin, _OncePerIterationScaling):
        plugin.update_scale()


def scaler_state(fabric: Fabric) -> Optional[dict]:
    """The fp16 GradScaler's state (None without one), for checkpoints."""
    return _plugin(fabric).state_dict() or None


def load_scaler_state(fabric: Fabric, state: Optional[dict]) -> None:
    if state:
        _plugin(fabric).load_state_dict(state)
