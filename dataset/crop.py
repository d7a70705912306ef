"""Pre-computing the five-crop training sets of cocostuff27 and cityscapes (STEGO's crop_datasets.py).

Each source image of train and val gives five crops (four corners and the centre, as torchvision's
``five_crop``) of ``crop_ratio`` of its height and width. Image ``i`` becomes crops ``5 i .. 5 i + 4``:
``img/{split}/{n}.jpg`` and ``label/{split}/{n}.png``, the label stored as class + 1 (0 = unlabelled).
Every file is written under a hidden temporary name and renamed, so an interrupted run leaves only
complete files; the next run writes the missing ones and a complete set is skipped.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

from dataset.base import SegmentationDataset
from dataset.build import FIVE_CROP_TYPES, MODES, cropped_samples, five_crop_dir, source_dataset
from dataset.classes import CROPPED_OFFSET
from config import DatasetConfig
from utils.errors import DataError
from utils.signals import worker_process_setup

log = logging.getLogger(__name__)

CROPS_PER_IMAGE = 5  # torchvision's five_crop: top-left, top-right, bottom-left, bottom-right, centre
CROP_JPEG_QUALITY = 75  # PIL's default, with which STEGO's crop_datasets.py saved its crops
WORKER_CHUNK = 4  # source images handed to a worker process at a time


@dataclass(frozen=True)
class CropReport:
    """What one split's run did: ``written`` source images were cropped now, the rest already were."""

    split: str
    folder: Path
    images: int
    written: int


def write_five_crops(cfg: DatasetConfig, num_workers: int = 0) -> list[CropReport]:
    """Write (or complete) the five-crop sets of train and val of ``cfg``; 0 workers = in this process."""
    if cfg.data_type not in FIVE_CROP_TYPES:
        raise DataError(f"five-crop sets are only used by {' and '.join(FIVE_CROP_TYPES)} "
                        f"(dataset.data_type is {cfg.data_type!r})")
    root = five_crop_dir(cfg)
    reports = []
    for mode in MODES:
        source = source_dataset(cfg, mode)
        cropper = _Cropper(source, cfg.crop_ratio, root / "img" / mode, root / "label" / mode)
        for folder in (cropper.image_dir, cropper.label_dir):
            folder.mkdir(parents=True, exist_ok=True)
            for partial in folder.glob(".*.partial"):  # a crop an interrupted run was writing
                partial.unlink()
        pending = cropper.pending()
        if pending:
            _run(cropper, pending, num_workers, desc=f"five-crop {cfg.data_type} {mode}")
        else:
            log.info("%s: complete (%d images), skipped", cropper.image_dir, len(source))
        _verify(root, mode, len(source))
        reports.append(CropReport(mode, root, len(source), len(pending)))
    return reports


class _Cropper:
    """Crops one source image and writes its five image and label files."""

    def __init__(self, source: SegmentationDataset, ratio: float, image_dir: Path, label_dir: Path) -> None:
        self.source, self.ratio, self.image_dir, self.label_dir = source, ratio, image_dir, label_dir

    def pending(self) -> list[int]:
        """Source images with at least one of their ten files missing."""
        images, labels = set(os.listdir(self.image_dir)), set(os.listdir(self.label_dir))
        return [i for i in range(len(self.source))
                if any(f"{n}.jpg" not in images or f"{n}.png" not in labels for n in _crop_numbers(i))]

    def __call__(self, index: int) -> None:
        image, label = self.source.load(index)
        size = [int(image.height * self.ratio), int(image.width * self.ratio)]
        if min(size) < 1:
            raise DataError(f"{self.source.samples[index].image}: {image.width}x{image.height} is too small for "
                            f"crops of ratio {self.ratio}")
        stored = Image.fromarray((label + CROPPED_OFFSET).astype(np.uint8))
        crops = zip(_crop_numbers(index), TF.five_crop(image, size), TF.five_crop(stored, size))
        for n, image_crop, label_crop in crops:
            _save(image_crop, self.image_dir / f"{n}.jpg", "JPEG", quality=CROP_JPEG_QUALITY)
            _save(label_crop, self.label_dir / f"{n}.png", "PNG")


def _crop_numbers(index: int) -> range:
    return range(index * CROPS_PER_IMAGE, (index + 1) * CROPS_PER_IMAGE)


def _save(image: Image.Image, path: Path, image_format: str, **options: Any) -> None:
    partial = path.with_name(f".{path.name}.partial")  # hidden: listings skip it
    image.save(partial, format=image_format, **options)
    os.replace(partial, path)


_worker_cropper: Optional[_Cropper] = None  # set in each worker process by _init_worker


def _init_worker(cropper: _Cropper, parent: int) -> None:
    global _worker_cropper
    worker_process_setup(parent)  # the pool's owner stops the workers on Ctrl-C; a dead owner, themselves
    _worker_cropper = cropper


def _crop_in_worker(index: int) -> None:
    _worker_cropper(index)


def _run(cropper: _Cropper, pending: list[int], num_workers: int, desc: str) -> None:
    total = len(cropper.source)
    with tqdm(total=total, initial=total - len(pending), desc=desc, unit="img") as bar:
        if num_workers == 0:
            for index in pending:
                cropper(index)
                bar.update()
            return
        with multiprocessing.get_context().Pool(num_workers, _init_worker, (cropper, os.getpid())) as pool:
            for _ in pool.imap_unordered(_crop_in_worker, pending, chunksize=WORKER_CHUNK):
                bar.update()


def _verify(root: Path, mode: str, n_images: int) -> None:
    found = len(cropped_samples(root, mode))
    expected = n_images * CROPS_PER_IMAGE
    if found != expected:
        raise DataError(f"{root}: {found} crops for {mode}, expected {expected} ({CROPS_PER_IMAGE} per image of "
                        f"{n_images}); the source changed since the crops were made: delete {root} and rerun")
