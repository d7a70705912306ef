"""Datasets of the STEGO family and the user's own images.

Public API:

- ``build_dataset(cfg, mode)``: the "train" or "val" set of a ``DatasetConfig``, or the "test" set of a
  ``directory`` one (``eval.split``; asking another type for it raises ``DataError``); items are dicts
  ``{"ind": int, "img": float 3 x H x W (ImageNet-normalised), "label": int64 H x W (-1 = ignore)}``.
  The dataset has ``n_classes`` and ``has_labels`` attributes.
- ``require_labels(dataset)``: raises ``DataError`` when a dataset has no labels (a ``directory`` set
  without ``labels/``); evaluation calls it first.
- ``class_names(cfg)`` -> list of str and ``color_map(cfg)`` -> uint8 array n_classes x 3: per-class
  names and display colours, available without the data on disk.
- ``fingerprint({"train": dataset, ...}, data_path)``: per split the number of images and labels and a hash of
  their file names relative to ``data_path``, the same wherever the data lies (a run records it).
- ``IMAGENET_MEAN``, ``IMAGENET_STD``: the normalisation of ``img`` (to undo it for display or the CRF).
- ``ensure_demo_data(data_path, seed)``: generates the synthetic demo set (data_type "demo") if absent.
- ``make_loader(dataset, cfg.dataloader, seed, device, ...)``, ``EpochSampler`` and ``SeededSamples``: the data
  loaders of training and evaluation, and the per-epoch order (split across data-parallel processes) that resume
  depends on.

Every problem with the data on disk raises ``utils.errors.DataError`` with the path and the expected layout.
"""
from dataset.base import SegmentationDataset, fingerprint
from dataset.build import build_dataset, five_crop_dir, require_labels, source_dataset, uses_five_crop
from dataset.classes import IGNORE, class_names, color_map, n_classes
from dataset.demo import ensure_demo_data
from dataset.loader import EpochSampler, SeededSamples, make_loader
from dataset.transforms import EVAL_RES, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "EVAL_RES", "IGNORE", "IMAGENET_MEAN", "IMAGENET_STD", "EpochSampler", "SeededSamples", "SegmentationDataset", "build_dataset",
    "class_names", "color_map", "ensure_demo_data", "fingerprint", "five_crop_dir", "make_loader", "n_classes", "require_labels",
    "source_dataset", "uses_five_crop",
]
