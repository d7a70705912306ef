"""Torch files on disk: written atomically, read with torch's safe loader.

Checkpoints and weight files go through these two functions. A file is written to a temporary file in the same
folder, flushed to disk and renamed over the old one, so a kill at any moment leaves either the previous file or
the new one, never a truncated file. What a PPAP checkpoint holds is engine/checkpoint.py's business.
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.errors import WeightsError


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_torch_file(path: str | Path, kind: str = "checkpoint") -> Any:
    """``torch.load`` on the CPU, restricted to tensors and plain containers (plus the argparse.Namespace that DINO
    training checkpoints hold); a missing or unreadable file raises ``WeightsError`` naming ``kind`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{kind} {path} not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"cannot read {kind} {path}: {first_line}") from None
