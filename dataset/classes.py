"""Class tables of every dataset type: raw label value -> class id, class names and colour maps.

Class ids run from 0 to n_classes - 1; ``IGNORE`` (-1) marks pixels that no metric or loss counts.
Raw values that no table lists are errors (``DataError``), never silently mapped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Union

import numpy as np

from dataset.demo import DEMO_CLASS_NAMES, DEMO_COLORS
from config import DatasetConfig
from utils.errors import DataError

IGNORE = -1  # label value of unlabelled pixels, as STEGO
_INVALID = -2  # lookup-table entry of raw values that no table lists

# COCO-Stuff 164k: fine ids 0..181 (91 thing ids, 80 of them used, then 91 stuff ids), 255 = unlabelled.
# The 27 coarse classes are COCO-Stuff's supercategories in the order of STEGO's get_class_labels;
# "food" and "furniture" exist as things and as stuff, so the stuff ones get a "-stuff" suffix here.
COCO_COARSE_NAMES = (
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen", "accessory", "animal", "outdoor",
    "person", "sports", "vehicle", "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial",
    "textile", "wall", "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)
COCO_UNLABELLED = 255  # COCO-Stuff's value of unlabelled pixels
COCO_FIRST_STUFF = 12  # coarse ids 0..11 are things, 12..26 stuff (STEGO's first_stuff_index)
COCOSTUFF3_COARSE = (23, 22, 21)  # sky, plant, ground -> cocostuff3 classes 0, 1, 2 (STEGO's Coco)
# Fine thing ids, in runs (first, last, coarse): the supercategory of each COCO thing category.
COCO_THING_RUNS = (
    (0, 0, 9), (1, 8, 11), (9, 14, 8), (15, 24, 7), (25, 32, 6), (33, 42, 10),
    (43, 50, 5), (51, 60, 2), (61, 70, 3), (71, 76, 0), (77, 82, 1), (83, 90, 4),
)
COCO_FIRST_STUFF_FINE = 91  # first fine stuff id (banner)
# Coarse class of each fine stuff id 91..181, the standard COCO-Stuff fine-to-coarse table (STEGO's Coco).
COCO_STUFF_FINE_TO_COARSE = (
    17, 17, 22, 20, 20, 22, 15, 25, 16, 13,  # fine ids 91..100
    12, 12, 17, 17, 23, 15, 15, 17, 15, 21,  # fine ids 101..110
    15, 25, 13, 13, 13, 13, 13, 22, 26, 14,  # fine ids 111..120
    14, 15, 22, 21, 21, 24, 20, 22, 15, 17,  # fine ids 121..130
    16, 15, 22, 24, 21, 17, 25, 16, 21, 17,  # fine ids 131..140
    22, 16, 21, 21, 25, 21, 26, 21, 24, 20,  # fine ids 141..150
    17, 14, 21, 26, 15, 23, 20, 21, 24, 15,  # fine ids 151..160
    24, 22, 25, 15, 20, 17, 17, 22, 14, 18,  # fine ids 161..170
    18, 18, 18, 18, 18, 18, 26, 26, 19, 19,  # fine ids 171..180
    24,  # fine id 181
)


def _coco_fine_to_coarse() -> dict[int, int]:
    table = {fine: coarse for first, last, coarse in COCO_THING_RUNS for fine in range(first, last + 1)}
    table.update({COCO_FIRST_STUFF_FINE + i: coarse for i, coarse in enumerate(COCO_STUFF_FINE_TO_COARSE)})
    return table


COCO_FINE_TO_COARSE: Mapping[int, int] = _coco_fine_to_coarse()

# Cityscapes gtFine labelIds 0..33; ids 0..6 are void, 7..33 the 27 classes (STEGO's CityscapesSeg).
CITYSCAPES_FIRST_CLASS_ID = 7
CITYSCAPES_LAST_ID = 33
CITYSCAPES_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky", "person",
    "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)
# The official colours of labelIds 7..33 (cityscapesScripts labels.py; STEGO's create_cityscapes_colormap).
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230),
    (119, 11, 32),
)

# ISPRS Potsdam, 6 fine classes merged into 3 (STEGO's Potsdam): 0 impervious surfaces, 1 building,
# 2 low vegetation, 3 tree, 4 car, 5 clutter; 255 = unlabelled.
POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
POTSDAM_UNLABELLED = 255
POTSDAM_NAMES = ("roads and cars", "buildings and clutter", "trees and vegetation")

DIRECTORY_IGNORE = 255  # value of unlabelled pixels in 'directory' and 'demo' label PNGs
CROPPED_OFFSET = 1  # five-crop label PNGs store class + 1, so 0 is unlabelled (STEGO's crop_datasets.py)

FIXED_N_CLASSES = {
    "cocostuff27": len(COCO_COARSE_NAMES),
    "cocostuff15": len(COCO_COARSE_NAMES) - COCO_FIRST_STUFF,
    "cocostuff3": len(COCOSTUFF3_COARSE),
    "cityscapes": len(CITYSCAPES_NAMES),
    "potsdam": len(POTSDAM_NAMES),
    "potsdamraw": len(POTSDAM_NAMES),
    "demo": len(DEMO_CLASS_NAMES),
}


class LabelTable:
    """Maps raw label values to class ids through a lookup table; unknown values raise ``DataError``."""

    def __init__(self, mapping: Mapping[int, int], known: str) -> None:
        self.lut = np.full(max(mapping) + 1, _INVALID, dtype=np.int64)
        for raw, cls in mapping.items():
            self.lut[raw] = cls
        self.known = known  # the valid raw values in words, for error messages

    def __call__(self, raw: np.ndarray, path: Union[str, Path]) -> np.ndarray:
        raw = raw.astype(np.int64, copy=False)
        low, high = int(raw.min()), int(raw.max())
        if low < 0 or high >= len(self.lut):
            self._fail(path, [low if low < 0 else high])
        mapped = self.lut[raw]
        invalid = mapped == _INVALID
        if invalid.any():
            self._fail(path, np.unique(raw[invalid]).tolist())
        return mapped

    def _fail(self, path: Union[str, Path], values: list[int]) -> None:
        shown = ", ".join(map(str, values[:5])) + (", ..." if len(values) > 5 else "")
        raise DataError(f"{path}: label value(s) {shown} outside the known range ({self.known})")


def coco_table(data_type: str) -> LabelTable:
    """COCO-Stuff fine ids -> cocostuff27 (coarse), cocostuff15 (stuff only) or cocostuff3 classes."""
    known = f"COCO-Stuff fine ids 0..{max(COCO_FINE_TO_COARSE)} and {COCO_UNLABELLED} = unlabelled"
    if data_type == "cocostuff27":
        mapping = dict(COCO_FINE_TO_COARSE)
    elif data_type == "cocostuff15":
        mapping = {f: c - COCO_FIRST_STUFF if c >= COCO_FIRST_STUFF else IGNORE for f, c in COCO_FINE_TO_COARSE.items()}
    elif data_type == "cocostuff3":
        mapping = {f: COCOSTUFF3_COARSE.index(c) if c in COCOSTUFF3_COARSE else IGNORE
                   for f, c in COCO_FINE_TO_COARSE.items()}
    else:
        raise ValueError(f"not a COCO-Stuff data type: {data_type!r}")
    return LabelTable({**mapping, COCO_UNLABELLED: IGNORE}, known)


def cityscapes_table() -> LabelTable:
    """Cityscapes labelIds -> labelId - 7; void ids 0..6 -> ignore."""
    mapping = {i: max(i - CITYSCAPES_FIRST_CLASS_ID, IGNORE) for i in range(CITYSCAPES_LAST_ID + 1)}
    return LabelTable(mapping, f"Cityscapes labelIds 0..{CITYSCAPES_LAST_ID}")


def potsdam_table() -> LabelTable:
    """Potsdam fine classes 0..5 -> 3 merged classes; 255 -> ignore."""
    return LabelTable({**POTSDAM_FINE_TO_COARSE, POTSDAM_UNLABELLED: IGNORE},
                      f"Potsdam classes 0..{max(POTSDAM_FINE_TO_COARSE)} and {POTSDAM_UNLABELLED} = unlabelled")


def directory_table(n_classes: int) -> LabelTable:
    """Label PNG values 0..n_classes-1 are classes, 255 is ignored."""
    if n_classes > DIRECTORY_IGNORE:
        raise DataError(f"directory labels are 8-bit PNGs with {DIRECTORY_IGNORE} = ignore: "
                        f"dataset.n_classes must be <= {DIRECTORY_IGNORE} (got {n_classes})")
    mapping = {i: i for i in range(n_classes)}
    return LabelTable({**mapping, DIRECTORY_IGNORE: IGNORE},
                      f"class ids 0..{n_classes - 1} and {DIRECTORY_IGNORE} = unlabelled")


def cropped_table(n_classes: int) -> LabelTable:
    """Five-crop label PNGs: stored value = class + 1, 0 -> ignore."""
    mapping = {i + CROPPED_OFFSET: i for i in range(n_classes)}
    return LabelTable({**mapping, 0: IGNORE}, f"five-crop values 0 = unlabelled and 1..{n_classes} = class + 1")


def n_classes(cfg: DatasetConfig) -> int:
    """The number of classes of ``cfg``'s dataset type."""
    if cfg.data_type == "directory":
        return int(cfg.n_classes)
    return FIXED_N_CLASSES[cfg.data_type]


def class_names(cfg: DatasetConfig) -> list[str]:
    """One display name per class id."""
    kind = cfg.data_type
    if kind == "directory":
        return list(cfg.class_names) if cfg.class_names else [f"class {i}" for i in range(n_classes(cfg))]
    if kind == "cocostuff27":
        return list(COCO_COARSE_NAMES)
    if kind == "cocostuff15":
        return list(COCO_COARSE_NAMES[COCO_FIRST_STUFF:])
    if kind == "cocostuff3":
        return [COCO_COARSE_NAMES[c] for c in COCOSTUFF3_COARSE]
    if kind == "cityscapes":
        return list(CITYSCAPES_NAMES)
    if kind in ("potsdam", "potsdamraw"):
        return list(POTSDAM_NAMES)
    if kind == "demo":
        return list(DEMO_CLASS_NAMES)
    raise ValueError(f"unknown data type {kind!r}")


def color_map(cfg: DatasetConfig) -> np.ndarray:
    """Display colours, uint8 array n_classes x 3 (row i = class i)."""
    if cfg.data_type == "cityscapes":
        return np.array(CITYSCAPES_COLORS, dtype=np.uint8)
    if cfg.data_type == "demo":
        return np.array(DEMO_COLORS, dtype=np.uint8)
    # The PASCAL VOC map from its second entry on: its first is black, the colour of unlabelled pixels here.
    return pascal_color_map(n_classes(cfg) + 1)[1:]


def pascal_color_map(n: int) -> np.ndarray:
    """The PASCAL VOC colour map (the bits of each index spread over R, G, B), as STEGO for COCO and others."""
    index = np.arange(n)
    colors = np.zeros((n, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colors[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colors.astype(np.uint8)
