"""Files on disk: outputs written atomically, torch files read safely, JSON without NaN, exclusive locks on folders.

Every output (checkpoints, reports, pictures, config.json) is written to a temporary file ``.NAME.XXXXXXXX.tmp`` in
the same folder and renamed over the old one, so a kill at any moment leaves either the previous file or the new
one, never a truncated file; checkpoints are flushed to disk first. Ctrl-C and SIGTERM are held off while a file is
written. A kill that cannot be held off (SIGKILL, a power cut) may
leave the temporary file behind: ``remove_temporaries`` removes those, and the program that owns the folder (see
``FolderLock``) calls it when it starts. What a PPAP checkpoint holds is engine/checkpoint.py's business.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import pickle
import re
import secrets
import shutil
import socket
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Sequence

from utils import signals
from utils.errors import OutputError, WeightsError

TMP_SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # the names save_atomically gives its temporary files
# What a file's first bytes say it is (describe_file):
SNIFF_BYTES = 512  # read from the start of a file
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first member, or the end record of an empty zip
NUMPY_MAGIC = b"\x93NUMPY"  # numpy's .npy format
PICKLE_PROTO = 0x80  # a pickle of protocol 2 or later starts with PROTO and the protocol's number
# torch.save's format before torch 1.6: a protocol-2 pickle that begins with torch's magic number (a 10-byte LONG1)
TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + 0x1950A86A20F9469CFC6C.to_bytes(10, "little")
SAFETENSORS_HEADER = 8  # safetensors: the JSON header's length (8 bytes, little-endian), then the header "{..."
TEXT_SHOWN = 40  # characters of a text file's first line shown in a message


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the file to: renamed over ``path`` when the block ends, removed if
    it fails. Ctrl-C and SIGTERM are held off meanwhile; a failed write (a full disk) raises ``OutputError`` naming
    ``path``. The file gets the permissions every output gets (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    with signals.deferred():
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise OutputError(f"cannot write {path}: {_write_failure(err, path.parent)}") from None
            raise


def save_atomically(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through ``atomic_output``, flushed to disk before the rename."""
    # torch loads only where a torch file is written or read: the locks, JSON and text files here serve commands that
    # load no torch (python -m tools.report)
    import torch

    path = Path(path)
    with atomic_output(path) as tmp, open(tmp, "xb") as f:
        try:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        except RuntimeError as err:  # torch's writer reports a failed write (or an interrupted one) this way
            raise OutputError(f"cannot write {path}: {_write_failure(err, path.parent)}") from None
    _fsync_dir(path.parent)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a text file through ``atomic_output``: readers see the old file or the new one, never half of it."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_failure(err: BaseException, folder: Path) -> str:
    """The OS's reason for a failed write: from the OSError in the chain, else from the free space left."""
    cause: Optional[BaseException] = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    try:
        if shutil.disk_usage(folder).free == 0:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def to_json(obj: Any, indent: Optional[int] = None) -> str:
    """JSON text of ``obj`` with NaN and infinities written as null: standard JSON has neither, and jq, JavaScript
    and many JSON readers refuse Python's NaN."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that interrupted ``save_atomically`` calls left in ``folder``; return them.

    Only for the folder's owner: another live process's temporary file would be deleted too."""
    removed = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.match(p.name)] if folder.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


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


class FolderLock:
    """An exclusive lock on a folder, held through a lock file in it (``flock``): the operating system releases it
    when the holder ends, however it ends, so a crashed run never leaves a folder locked.

    The lock file holds "PID HOST" of its holder, for the message of whoever finds the folder taken."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Optional[IO[str]] = None
        self._created: list[Path] = []  # the folders acquire() made, innermost first

    def acquire(self, wait: bool = False) -> bool:
        """Take the lock; without ``wait``, return False at once if another process holds it."""
        self._created = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            file.close()
            return False
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()} {socket.gethostname()}\n")
        file.flush()
        self._file = file
        return True

    def holder(self) -> str:
        """"process PID on HOST" as the lock file names its holder (best effort)."""
        try:
            pid, host = self.path.read_text(encoding="utf-8").split()[:2]
        except (OSError, ValueError):
            return "another process"
        return f"process {pid} on {host}"

    def release(self, undo: bool = False) -> None:
        """Release the lock. ``undo``: the holder gave up before writing anything (a refused start), so the lock
        file goes, and so do the folders ``acquire`` made, if nothing else came into them meanwhile."""
        if self._file is None:
            return
        if undo and [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
            self.path.unlink()
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # not empty: another process writes there now
                    break
        self._file.close()  # closing the file releases the lock
        self._file = None

    def __enter__(self) -> FolderLock:
        self.acquire(wait=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_torch_file(path: str | Path, kind: str = "checkpoint") -> Any:
    """``torch.load`` on the CPU, restricted to tensors and plain containers (plus the argparse.Namespace that DINO
    training checkpoints hold); a missing or unreadable file raises ``WeightsError`` naming ``kind`` and the path,
    and for a file torch.save did not write, what it is (``describe_file``)."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{kind} {path} is a folder, not a file")
    if not path.exists():
        raise WeightsError(f"{kind} {path} not found")
    if not path.is_file():
        raise WeightsError(f"{kind} {path} is not a regular file (a device or a pipe); pass the file itself")
    if path.stat().st_size == 0:
        raise WeightsError(f"{kind} {path} is {describe_file(path)}")
    # torch warns about what it meets in a foreign file (a pickle of another protocol) before it fails: its warnings
    # are shown only for a file that loads, so that a refused one ends in one line
    with warnings.catch_warnings(record=True) as caught:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                content = torch.load(path, map_location="cpu", weights_only=True)
        except OSError as err:  # the file itself cannot be read (permissions, an I/O error)
            raise WeightsError(f"cannot read {kind} {path}: {err.strerror or _first_line(err)}") from None
        except Exception as err:  # the weights-only unpickler fails on foreign bytes with what it meets (KeyError, ...)
            raise _unreadable(path, kind, err) from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return content


def _unreadable(path: Path, kind: str, failure: Exception) -> WeightsError:
    """Why ``torch.load`` failed on ``path``: what the file is, or for a file of torch.save's formats, the failure."""
    what = describe_file(path)
    if what is not None:
        return WeightsError(f"cannot read {kind} {path}: it is {what}")
    if isinstance(failure, EOFError):
        return WeightsError(f"cannot read {kind} {path}: the file ends early (truncated?)")
    if isinstance(failure, pickle.UnpicklingError):  # torch's advice (weights_only=False) would run the file's code
        return WeightsError(f"cannot read {kind} {path}: it holds Python objects other than tensors and plain "
                            f"containers, which are not loaded (they could run code); is it a {kind} at all?")
    return WeightsError(f"cannot read {kind} {path}: {_first_line(failure)}")


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def describe_file(path: str | Path) -> Optional[str]:
    """What a file is, from its first bytes, when torch.save did not write it: "empty (0 bytes) ...", "a text file
    (it begins '...') ...", "a zip archive cut short ...", "a numpy array (.npy ...)", "numpy arrays (.npz ...)", a
    pickle, a safetensors file, "binary data of no kind known here ..."; None for a file of torch.save's formats (a
    zip holding data.pkl, or the legacy pickle)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes): an interrupted copy or download?"
    with path.open("rb") as file:
        head = file.read(SNIFF_BYTES)
    if head.startswith(ZIP_MAGIC):
        return _describe_zip(path, size)
    if head.startswith(NUMPY_MAGIC):
        return "a numpy array (.npy, as numpy.save writes it), not a file torch.save writes"
    if head.startswith(TORCH_LEGACY_MAGIC):
        return None
    if len(head) > 1 and head[0] == PICKLE_PROTO and head[1] <= pickle.HIGHEST_PROTOCOL:
        return "a Python pickle not written by torch.save (pickle.dump's format)"
    if len(head) > SAFETENSORS_HEADER and head[SAFETENSORS_HEADER:SAFETENSORS_HEADER + 1] == b"{" \
            and int.from_bytes(head[:SAFETENSORS_HEADER], "little") < size:
        return "a safetensors file: load it with safetensors.torch.load_file and torch.save the state dict"
    text = _as_text(head)
    if text is not None and not text.strip():
        return "a text file of white space only, not a file torch.save writes"
    if text is not None:
        return f"a text file (it begins {text.strip().splitlines()[0][:TEXT_SHOWN]!r}), not a file torch.save writes"
    return f"binary data of no kind known here (it begins {head[:8].hex(' ')})"


def _describe_zip(path: Path, size: int) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:  # the archive's directory, at its end, is missing
        return f"a zip archive cut short ({size} bytes; its end is missing): an interrupted copy or download?"
    if any(name.rpartition("/")[2] == "data.pkl" for name in names):
        return None
    if names and all(name.endswith(".npy") for name in names):
        return f"numpy arrays (.npz, as numpy.savez writes them: {listed([n[:-4] for n in names])}), not a file " \
               f"torch.save writes"
    return f"a zip archive of other files ({listed(names)})"


def _as_text(head: bytes) -> Optional[str]:
    """``head`` as text when it is UTF-8 of printable characters and white space (a character cut at the end too)."""
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        if err.reason != "unexpected end of data":
            return None
        text = head[:err.start].decode("utf-8-sig")
    return text if all(c.isprintable() or c in "\t\n\r\f\v" for c in text) else None


def describe_contents(obj: Any, expected: str) -> str:
    """What a loaded torch file holds, for a message that says it is not what was expected (``expected``: whose keys
    a state dict should have, e.g. "a ViT's"): "another model's weights, a state dict of 2 tensors whose keys are not
    a ViT's (conv1.weight, fc.bias)", "a dict whose keys ...", "a single tensor of shape [3]", "a list"."""
    import torch

    if isinstance(obj, Mapping) and obj:
        keys = listed([str(k) for k in obj])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            tensors = f"{len(obj)} tensor{'s' if len(obj) > 1 else ''}"
            return f"another model's weights, a state dict of {tensors} whose keys are not {expected} ({keys})"
        return f"a dict whose keys are not {expected} ({keys})"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {list(obj.shape)}"
    return f"an empty {type(obj).__name__}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"


def listed(items: Sequence[str], limit: int = 5) -> str:
    """"a, b, c, d, e, ... (3 more)": the first ``limit`` items, and how many are left out."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
