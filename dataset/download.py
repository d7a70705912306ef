"""Downloading and unpacking the STEGO-format dataset archives (cocostuff, cityscapes, potsdam, potsdamraw).

``download_datasets(data_path, names)`` fetches ``{base_url}/{name}.zip`` into ``data_path`` and unpacks
it to ``data_path/{name}``; point ``dataset.data_path`` there (cocostuff serves cocostuff27, 15 and 3).
A download goes to ``{name}.zip.part`` first and resumes from its end on the next run (HTTP Range; a
server that ignores Range sends everything again and the bytes already there are skipped). Unpacking goes
to a hidden folder renamed at the end, so ``data_path/{name}`` exists only when complete, and is skipped then.
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional, Sequence, Union

from tqdm import tqdm

from utils.errors import DataError

log = logging.getLogger(__name__)

# where STEGO's download_datasets.py fetches its archives
STEGO_DATA_URL = "https://marhamilresearch4.blob.core.windows.net/stego-public/pytorch_data/"
DOWNLOAD_NAMES = ("cocostuff", "cityscapes", "potsdam", "potsdamraw")  # the archives STEGO publishes
CHUNK_BYTES = 1 << 20  # bytes read from the network per write
TIMEOUT_S = 60  # seconds without data before a download counts as failed
HTTP_PARTIAL_CONTENT = 206  # the server honoured the Range header
HTTP_RANGE_NOT_SATISFIABLE = 416  # the Range starts at or after the end: the partial file is complete
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-\d+|\*)/(\d+)")


def download_datasets(data_path: Union[str, Path], names: Sequence[str] = DOWNLOAD_NAMES,
                      base_url: str = STEGO_DATA_URL, keep_archives: bool = False) -> list[Path]:
    """Download and unpack each named archive unless ``data_path/{name}`` exists; return those folders."""
    unknown = [n for n in names if n not in DOWNLOAD_NAMES]
    if unknown:
        raise DataError(f"unknown dataset(s) {', '.join(unknown)}: choose from {', '.join(DOWNLOAD_NAMES)}")
    root = Path(data_path)
    if root.exists() and not root.is_dir():
        raise DataError(f"--data_path {root} is a file; give the folder that receives the datasets")
    root.mkdir(parents=True, exist_ok=True)
    folders = []
    for name in names:
        target = root / name
        if target.is_dir():
            log.info("%s exists, skipping %s", target, name)
        else:
            archive = root / f"{name}.zip"
            if not archive.is_file():
                download_file(f"{base_url.rstrip('/')}/{name}.zip", archive)
            unpack(archive, target)
            if not keep_archives:
                archive.unlink()
        folders.append(target)
    return folders


def download_file(url: str, dest: Union[str, Path]) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file left by an earlier run."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == HTTP_RANGE_NOT_SATISFIABLE and start and _range_total(err.headers.get("Content-Range")) == start:
            os.replace(part, dest)
            return dest
        raise DataError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"cannot reach {url} ({reason}); check the network connection or the base URL") from None
    with response:
        total = _receive(response, part, start, url, dest.name)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"download of {url} stopped at {size} of {total} bytes; rerun to resume from {part}")
    os.replace(part, dest)
    return dest


def _receive(response, part: Path, start: int, url: str, label: str) -> Optional[int]:
    """Append the response body to ``part`` (already ``start`` bytes long); return the full size if known."""
    resumed = start > 0 and getattr(response, "status", None) == HTTP_PARTIAL_CONTENT
    if resumed:
        total = _range_total(response.headers.get("Content-Range"))
    else:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else None
        if start and total is not None and total < start:  # the remote file changed: start over
            start = 0
    mode = "ab" if start else "wb"
    try:
        with open(part, mode) as out, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=label) as bar:
            if start and not resumed:
                _skip(response, start)
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise DataError(f"download of {url} was interrupted ({err}); check the network connection and rerun "
                        f"to resume from {part}") from None
    return total


def _skip(response, count: int) -> None:
    """Read and drop ``count`` bytes: the part already on disk, from a source that ignored Range."""
    while count > 0:
        chunk = response.read(min(CHUNK_BYTES, count))
        if not chunk:
            return
        count -= len(chunk)


def _range_total(content_range: Optional[str]) -> Optional[int]:
    match = _CONTENT_RANGE.fullmatch(content_range.strip()) if content_range else None
    return int(match.group(2)) if match else None


def unpack(archive: Union[str, Path], target: Union[str, Path]) -> Path:
    """Unzip ``archive`` into the folder ``target`` (an archive holding one top folder of that name is unwrapped)."""
    archive, target = Path(archive), Path(target)
    staging = target.parent / f".{target.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        inner = staging / target.name
        top = [p for p in staging.iterdir() if not p.name.startswith("__MACOSX")]
        os.replace(inner if top == [inner] and inner.is_dir() else staging, target)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as err:
        raise DataError(f"{archive} is not a complete zip archive ({err}); "
                        f"delete it and rerun to download it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("unpacked %s into %s", archive, target)
    return target
