"""The one Dataset class behind every format, and the readers of image, label and .mat files."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.io import loadmat
from torch.utils.data import Dataset
from torchvision.transforms.functional import to_pil_image

from dataset.classes import IGNORE, LabelTable
from dataset.transforms import PairTransform
from utils.errors import DataError

LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")  # single-channel PIL modes that hold class ids
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's 16-bit grey images
UINT8_MAX, UINT16_MAX = 255, 65535
MAT_IMAGE_KEY = "img"  # Potsdam .mat files: image under "img" (H x W x 4, RGB + infrared), STEGO's Potsdam
MAT_LABEL_KEY = "gt"  # Potsdam .mat files: label under "gt" (H x W)


@dataclass(frozen=True)
class Sample:
    """One image and its label file (None for an unlabelled image)."""

    image: Path
    label: Optional[Path]


def read_image(path: Path) -> Image.Image:
    """An image file as 8-bit RGB; an unreadable file, or a kind of image with no RGB reading, raises ``DataError``.

    Alpha is dropped; palette, grey, CMYK and YCbCr images are converted; 16-bit grey images (common for scientific
    and medical data) are scaled to 8 bits (PIL's own conversion would clip them to white)."""
    try:
        with Image.open(path) as img:
            return _to_rgb(img, path)
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: {err} Shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's decoders raise all three
        raise DataError(f"{path}: cannot read the image ({err}); the file is corrupt or not an image") from None


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        values = np.asarray(img)
        if values.min() < 0 or values.max() > UINT16_MAX:
            raise DataError(f"{path}: a {img.mode} image with values outside 0..{UINT16_MAX}; save it as 8- or 16-bit")
        if img.mode == "I" and values.max() <= UINT8_MAX:  # 8-bit values stored in 32-bit integers
            grey = values.astype(np.uint8)
        else:
            grey = ((values.astype(np.uint32) * UINT8_MAX + UINT16_MAX // 2) // UINT16_MAX).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if img.mode == "F":
        raise DataError(f"{path}: a floating-point image (mode F) has no fixed range of values; save it as 8- or "
                        f"16-bit")
    try:
        return img.convert("RGB")
    except ValueError:
        raise DataError(f"{path}: images of mode {img.mode} cannot be read as RGB; save it as RGB") from None


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label image as an integer array of raw values."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in LABEL_MODES:
                raise DataError(f"{path}: a label must be a single-channel image of class ids "
                                f"(got mode {img.mode}; colour-coded labels are not supported)")
            return np.array(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{path}: cannot read the label ({err}); the file is corrupt or not an image") from None


def _read_mat(path: Path, key: str) -> np.ndarray:
    try:
        content = loadmat(str(path))
    except Exception as err:  # scipy raises MatReadError, ValueError, OSError, TypeError ... for bad files
        raise DataError(f"{path}: cannot read the .mat file ({type(err).__name__}: {err})") from None
    if key not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DataError(f"{path}: no variable {key!r} in the .mat file (found {found})")
    return np.asarray(content[key])


def read_mat_image(path: Path) -> Image.Image:
    """A Potsdam .mat image: its first three channels (the infrared channel is dropped, as STEGO)."""
    arr = _read_mat(path, MAT_IMAGE_KEY)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise DataError(f"{path}: {MAT_IMAGE_KEY!r} must be H x W x C with C >= 3 (got shape {arr.shape})")
    return to_pil_image(torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[:3])


def read_mat_label(path: Path) -> np.ndarray:
    """A Potsdam .mat label: an H x W array of integer class ids."""
    arr = _read_mat(path, MAT_LABEL_KEY)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: {MAT_LABEL_KEY!r} must be an H x W array (got shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{path}: {MAT_LABEL_KEY!r} must hold integer class ids (got {arr.dtype} fractions)")
        arr = arr.astype(np.int64)
    return arr


@dataclass(frozen=True)
class Reader:
    """How one format stores its files: a reader for images and one for labels."""

    image: Callable[[Path], Image.Image]
    label: Callable[[Path], np.ndarray]


IMAGE_FILES = Reader(read_image, read_label_png)
MAT_FILES = Reader(read_mat_image, read_mat_label)


class SegmentationDataset(Dataset):
    """Images with per-pixel class ids. Items: ``{"ind", "img", "label"}``.

    ``img`` is a normalised float tensor 3 x H x W, ``label`` an int64 tensor H x W with -1 = ignore
    (all -1 when ``has_labels`` is false), ``ind`` the item's index.
    """

    def __init__(self, samples: Sequence[Sample], table: LabelTable, n_classes: int, transform: PairTransform,
                 reader: Reader = IMAGE_FILES, missing_labels: str = "") -> None:
        self.samples = list(samples)
        self.table = table
        self.n_classes = n_classes
        self.transform = transform
        self.reader = reader
        self.has_labels = all(s.label is not None for s in self.samples)
        self.missing_labels = missing_labels  # why there are no labels, for require_labels

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The untransformed RGB image and its class-id array (int64, -1 = ignore)."""
        sample = self.samples[index]
        image = self.reader.image(sample.image)
        if sample.label is None:
            return image, np.full((image.height, image.width), IGNORE, dtype=np.int64)
        raw = self.reader.label(sample.label)
        if raw.shape != (image.height, image.width):
            raise DataError(f"{sample.label}: label is {raw.shape[1]}x{raw.shape[0]} but its image {sample.image} "
                            f"is {image.width}x{image.height}; they must have the same size")
        return image, self.table(raw, sample.label)

    def has_labelled_pixels(self) -> bool:
        """Whether any label holds a pixel of a class (not every pixel ignored); reads labels until it finds one."""
        for sample in self.samples:
            if sample.label is not None and bool((self.table(self.reader.label(sample.label), sample.label) >= 0).any()):
                return True
        return False

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        try:
            img, label_t = self.transform(image, label)
        except Image.DecompressionBombError as err:  # the resize to the configured resolution made it too large
            raise DataError(f"{self.samples[index].image}: resized to {self.transform.res} px, {err} Lower "
                            f"dataset.res") from None
        return {"ind": index, "img": img, "label": label_t}


def fingerprint(splits: Mapping[str, SegmentationDataset], root: str | Path) -> dict[str, dict[str, Any]]:
    """What tells the data of runs apart wherever it lies: per split (``{"train": dataset, ...}``), the number of
    images and of labels and a SHA-256 of the sorted file names relative to ``root``. File contents are not read
    (that would take as long as an epoch): the same names with other contents are not told apart."""
    prefix = os.path.join(str(Path(root)), "")  # samples are paths below Path(root)

    def relative(path: Optional[Path]) -> str:
        if path is None:
            return ""
        name = str(path)
        return name[len(prefix):] if name.startswith(prefix) else os.path.relpath(name, root)

    out = {}
    for mode, dataset in splits.items():
        names = sorted(f"{relative(s.image)}\t{relative(s.label)}" for s in dataset.samples)
        digest = hashlib.sha256("\n".join(names).encode("utf-8", "surrogateescape")).hexdigest()
        out[mode] = {"images": len(names), "labels": sum(s.label is not None for s in dataset.samples),
                     "names_sha256": digest}
    return out
