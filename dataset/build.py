"""``build_dataset(cfg, mode)``: find every file of a dataset on disk and check the layout before training.

Each format's listing checks, once, that its folders exist, that the image list is not empty and that
every image has its label and every label its image; anything else raises one ``DataError`` naming the
path and the expected layout. Label values and unreadable files are checked when an item is read.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Optional

import dataset.classes as classes
from dataset.base import IMAGE_FILES, MAT_FILES, Reader, Sample, SegmentationDataset
from dataset.demo import ensure_demo_data
from dataset.transforms import PairTransform, eval_transform, train_transform
from config import EVAL_RES, DatasetConfig
from utils.errors import DataError

MODES = ("train", "val")  # the splits of every data type (crop.py five-crops each)
TEST = "test"  # eval.split "test": a separate test split, which only a 'directory' set has (imgs/test)
FIVE_CROP_TYPES = ("cocostuff27", "cityscapes")  # the types STEGO pre-crops for training
DEMO_SEED = 0  # seed of the demo set that build_dataset generates

COCO_SPLITS = {"train": "train2017", "val": "val2017"}
COCO_FULL_LIST = "Coco164kFull_Stuff_Coarse.txt"  # all curated images (STEGO's Coco, subset None)
COCO_FINE_7_LIST = "Coco164kFull_Stuff_Coarse_7.txt"  # IIC "fine" subset (subset 7)
COCO_FEW_6_LIST = "Coco164kFew_Stuff_6.txt"  # IIC "coarse" subset (subset 6)
COCO_LISTS = {  # (data_type, mode) -> image list, as STEGO's ContrastiveSegDataset
    ("cocostuff27", "train"): COCO_FULL_LIST, ("cocostuff27", "val"): COCO_FINE_7_LIST,
    ("cocostuff15", "train"): COCO_FINE_7_LIST, ("cocostuff15", "val"): COCO_FINE_7_LIST,
    ("cocostuff3", "train"): COCO_FEW_6_LIST, ("cocostuff3", "val"): COCO_FEW_6_LIST,
}
COCO_LAYOUT = ("data_path/images/{train2017,val2017}/ID.jpg, data_path/annotations/{train2017,val2017}/ID.png "
               "and data_path/curated/{train2017,val2017}/<image list>.txt")
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"  # torchvision's Cityscapes file names
CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"  # mode "fine", target_type "semantic"
CITYSCAPES_LAYOUT = ("data_path/leftImg8bit/{train,val}/CITY/NAME_leftImg8bit.png and "
                     "data_path/gtFine/{train,val}/CITY/NAME_gtFine_labelIds.png (torchvision's Cityscapes layout)")
POTSDAM_LISTS = {"train": "labelled_train.txt", "val": "labelled_test.txt"}  # STEGO's Potsdam splits
POTSDAM_LAYOUT = "data_path/imgs/ID.mat (key 'img'), data_path/gt/ID.mat (key 'gt') and data_path/<split>.txt"
POTSDAMRAW_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)\.mat$")  # {image}_{row}_{column}.mat tiles
POTSDAMRAW_LAYOUT = ("data_path/processed/imgs/{im}_{i}_{j}.mat (key 'img') and "
                     "data_path/processed/gt/{im}_{i}_{j}.mat (key 'gt')")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DIRECTORY_LAYOUT = ("data_path/imgs/{train,val}/NAME.jpg (or .png ...) and, optionally, "
                    "data_path/labels/{train,val}/NAME.png with one class id per pixel (255 = ignore)")
DIRECTORY_TEST_LAYOUT = ("data_path/imgs/test/NAME.jpg (or .png ...) and, where data_path/labels exists, "
                         "data_path/labels/test/NAME.png")
CROP_LAYOUT = "data_path/cropped/{name}_five_crop_{ratio}/img/{split}/{i}.jpg and .../label/{split}/{i}.png"


def build_dataset(cfg: DatasetConfig, mode: str, eval_res: int = EVAL_RES) -> SegmentationDataset:
    """The training ("train"), validation ("val") or test ("test", ``eval.split``) set of ``cfg``.

    Training reads the pre-computed five-crop set when ``cfg.crop_type`` is "five" and the type is
    cocostuff27 or cityscapes; for every other type, and always for "val" and "test", ``crop_type`` is ignored, as
    in the original. Training uses ``cfg.res`` and ``cfg.loader_crop_type``; "val" and "test" resize and centre-crop
    to ``eval_res`` (``eval.res``, 320 as STEGO and PPAP). Only a 'directory' set has a "test" split
    (``require_test_split``).
    """
    if mode not in MODES + (TEST,):
        raise ValueError(f"mode must be one of {MODES + (TEST,)} (got {mode!r})")
    transform = train_transform(cfg.res, cfg.loader_crop_type) if mode == "train" else eval_transform(eval_res)
    if mode == "train" and uses_five_crop(cfg):
        n = classes.n_classes(cfg)
        samples = cropped_samples(five_crop_dir(cfg), mode)
        return SegmentationDataset(samples, classes.cropped_table(n), n, transform)
    return source_dataset(cfg, mode, transform)


def uses_five_crop(cfg: DatasetConfig) -> bool:
    """Whether training reads the five-crop set (crop_type "five" and a type STEGO pre-crops)."""
    return cfg.crop_type == "five" and cfg.data_type in FIVE_CROP_TYPES


def five_crop_dir(cfg: DatasetConfig) -> Path:
    """The folder of ``cfg``'s five-crop set: data_path/cropped/{data_type}_five_crop_{crop_ratio}."""
    return Path(cfg.data_path) / "cropped" / f"{cfg.data_type}_five_crop_{cfg.crop_ratio}"


def source_dataset(cfg: DatasetConfig, mode: str, transform: Optional[PairTransform] = None) -> SegmentationDataset:
    """The original (not five-cropped) images of ``mode``; ``transform`` defaults to the evaluation one."""
    if mode == TEST:
        require_test_split(cfg)
    transform = transform or eval_transform()
    root, kind, n = Path(cfg.data_path), cfg.data_type, classes.n_classes(cfg)
    reader: Reader = IMAGE_FILES
    missing_labels = ""
    if kind in ("cocostuff27", "cocostuff15", "cocostuff3"):
        samples, table = coco_samples(root, mode, COCO_LISTS[kind, mode]), classes.coco_table(kind)
    elif kind == "cityscapes":
        samples, table = cityscapes_samples(root, mode), classes.cityscapes_table()
    elif kind == "potsdam":
        samples, table, reader = potsdam_samples(root, mode), classes.potsdam_table(), MAT_FILES
    elif kind == "potsdamraw":
        samples, table, reader = potsdamraw_samples(root), classes.potsdam_table(), MAT_FILES
    elif kind in ("directory", "demo"):
        if kind == "demo":
            root = ensure_demo_data(root, seed=DEMO_SEED)
        samples, table = directory_samples(root, mode), classes.directory_table(n)
        missing_labels = (f"{root / 'labels'} not found: evaluation needs one label PNG per image in "
                          f"{root / 'labels' / mode} (same names as the images, values 0..{n - 1}, 255 = ignore)")
    else:
        raise ValueError(f"unknown data type {kind!r}")
    return SegmentationDataset(samples, table, n, transform, reader, missing_labels)


def require_test_split(cfg: DatasetConfig) -> None:
    """Raise ``DataError`` unless ``cfg`` has a separate test split: a 'directory' set with imgs/test and, where it
    has labels/, labels/test. Every other type has only the splits it trains and validates on."""
    if cfg.data_type != "directory":
        raise DataError(f"eval.split \"test\": dataset.data_type {cfg.data_type!r} has no separate test split (only "
                        f"a 'directory' set has one: {DIRECTORY_TEST_LAYOUT}); report on eval.split=val")
    root = Path(cfg.data_path)
    folders = [root / "imgs" / TEST]
    if (root / "labels").exists():
        folders.append(root / "labels" / TEST)
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"{folder} not found or not a folder: eval.split \"test\" reads the test split of a "
                            f"'directory' set, {DIRECTORY_TEST_LAYOUT}")


def require_labels(dataset: SegmentationDataset) -> None:
    """Raise ``DataError`` unless every image of ``dataset`` has a label and some pixel is labelled with a class
    (evaluation needs them)."""
    if not dataset.has_labels:
        raise DataError(dataset.missing_labels or "this dataset has no labels, and evaluation needs them")
    if not dataset.has_labelled_pixels():
        raise DataError(f"the labels of {_folder_of(dataset)} mark every pixel as ignored (no pixel of the "
                        f"{dataset.n_classes} classes): there is nothing to score")


def _folder_of(dataset: SegmentationDataset) -> Path:
    return dataset.samples[0].label.parent if dataset.samples and dataset.samples[0].label else Path("the dataset")


def coco_samples(root: Path, mode: str, list_name: str) -> list[Sample]:
    """COCO-Stuff: the ids of curated/{split}/{list_name}, image and label per id."""
    split = COCO_SPLITS[mode]
    list_file = root / "curated" / split / list_name
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    for folder in (root, image_dir, label_dir):
        _require_dir(folder, COCO_LAYOUT)
    if not list_file.is_file():
        raise DataError(f"image list {list_file} not found: expected {COCO_LAYOUT}")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"image list {list_file} is empty: it must name one image id per line")
    return _pair(image_dir, label_dir, [f"{i}.jpg" for i in ids], [f"{i}.png" for i in ids], list_file, COCO_LAYOUT)


def cityscapes_samples(root: Path, mode: str) -> list[Sample]:
    """Cityscapes: every CITY/NAME_leftImg8bit.png of the split with its gtFine labelIds file."""
    image_root, label_root = root / "leftImg8bit" / mode, root / "gtFine" / mode
    for folder in (root, image_root, label_root):
        _require_dir(folder, CITYSCAPES_LAYOUT)
    images = _cityscapes_keys(image_root, CITYSCAPES_IMAGE_SUFFIX, others_allowed=False)
    labels = _cityscapes_keys(label_root, CITYSCAPES_LABEL_SUFFIX, others_allowed=True)  # gtFine has more files
    if not images:
        raise DataError(f"{image_root}: no images found; expected {CITYSCAPES_LAYOUT}")
    _check_orphans(image_root, label_root, images, labels, CITYSCAPES_IMAGE_SUFFIX, CITYSCAPES_LABEL_SUFFIX,
                   CITYSCAPES_LAYOUT)
    return [Sample(image_root / f"{key}{CITYSCAPES_IMAGE_SUFFIX}", label_root / f"{key}{CITYSCAPES_LABEL_SUFFIX}")
            for key in images]


def _cityscapes_keys(root: Path, suffix: str, others_allowed: bool) -> list[str]:
    """The keys "CITY/NAME" of the files CITY/NAME{suffix} under ``root``, sorted city by city."""
    keys = []
    for city in _entries(root):
        if not (root / city).is_dir():
            raise DataError(f"{root / city}: unexpected file, expected {CITYSCAPES_LAYOUT}")
        for name in _entries(root / city):
            if name.endswith(suffix):
                keys.append(f"{city}/{name[: -len(suffix)]}")
            elif not others_allowed:
                raise DataError(f"{root / city / name}: unexpected file, expected {CITYSCAPES_LAYOUT}")
    return keys


def potsdam_samples(root: Path, mode: str) -> list[Sample]:
    """Potsdam: the ids of labelled_train.txt (train) or labelled_test.txt (val), one .mat pair per id."""
    _require_dir(root, POTSDAM_LAYOUT)
    list_file = root / POTSDAM_LISTS[mode]
    if not list_file.is_file():
        raise DataError(f"split file {list_file} not found: expected {POTSDAM_LAYOUT}")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {list_file} is empty: it must name one image id per line")
    image_dir, label_dir = root / "imgs", root / "gt"
    for folder in (image_dir, label_dir):
        _require_dir(folder, POTSDAM_LAYOUT)
    names = [f"{i}.mat" for i in ids]
    return _pair(image_dir, label_dir, names, names, list_file, POTSDAM_LAYOUT)


def potsdamraw_samples(root: Path) -> list[Sample]:
    """Potsdam raw tiles: every processed/imgs/{im}_{i}_{j}.mat in numeric order, for train and val alike."""
    image_dir, label_dir = root / "processed" / "imgs", root / "processed" / "gt"
    for folder in (root, image_dir, label_dir):
        _require_dir(folder, POTSDAMRAW_LAYOUT)
    keys = {}
    for name in _entries(image_dir):
        match = POTSDAMRAW_NAME.match(name)
        if match is None:
            raise DataError(f"{image_dir / name}: unexpected file, expected {POTSDAMRAW_LAYOUT}")
        keys[name] = tuple(int(g) for g in match.groups())
    names = sorted(keys, key=keys.__getitem__)
    if not names:
        raise DataError(f"{image_dir}: no tiles found; expected {POTSDAMRAW_LAYOUT}")
    _check_orphans(image_dir, label_dir, names, _entries(label_dir), "", "", POTSDAMRAW_LAYOUT)
    return [Sample(image_dir / n, label_dir / n) for n in names]


def directory_samples(root: Path, mode: str) -> list[Sample]:
    """Your own images: imgs/{split}/*, labels (optional) labels/{split}/NAME.png paired by file stem."""
    image_dir = root / "imgs" / mode
    layout = DIRECTORY_TEST_LAYOUT if mode == TEST else DIRECTORY_LAYOUT
    for folder in (root, root / "imgs", image_dir):
        _require_dir(folder, layout)
    images = _entries(image_dir)
    if not images:
        raise DataError(f"{image_dir} holds no images; expected {layout}")
    stems = _stems(image_dir, images, IMAGE_EXTENSIONS)
    if not (root / "labels").exists():
        return [Sample(image_dir / n, None) for n in images]
    label_dir = root / "labels" / mode
    _require_dir(label_dir, layout + f" ({root / 'labels'} exists, so every split needs its labels)")
    label_stems = _stems(label_dir, _entries(label_dir), (".png",))
    _check_orphans(image_dir, label_dir, list(stems), list(label_stems), "", ".png", layout, image_names=stems)
    return [Sample(image_dir / stems[s], label_dir / label_stems[s]) for s in stems]


def cropped_samples(root: Path, mode: str) -> list[Sample]:
    """A five-crop set written by crop_datasets.py: img/{split}/{i}.jpg and label/{split}/{i}.png, i = 0..n-1."""
    image_dir, label_dir = root / "img" / mode, root / "label" / mode
    hint = ("create it with `python dataset/crop_datasets.py --opt <option file>` or train on the original "
            "images with dataset.crop_type=null")
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataError(f"five-crop set {folder} not found ({hint}); expected {CROP_LAYOUT}")
    images = _numbered(image_dir, ".jpg")
    labels = _numbered(label_dir, ".png")
    if not images:
        raise DataError(f"five-crop set {image_dir} is empty ({hint})")
    orphans = sorted(labels - images)
    if orphans:
        raise DataError(f"{label_dir / f'{orphans[0]}.png'} has no image {image_dir / f'{orphans[0]}.jpg'}; "
                        f"rerun crop_datasets.py to complete the set")
    count = max(images) + 1
    for index in range(count):
        if index not in images or index not in labels:
            missing = image_dir / f"{index}.jpg" if index not in images else label_dir / f"{index}.png"
            raise DataError(f"five-crop set is incomplete: {missing} is missing; rerun crop_datasets.py to complete it")
    return [Sample(image_dir / f"{i}.jpg", label_dir / f"{i}.png") for i in range(count)]


def _require_dir(path: Path, layout: str) -> None:
    if not path.is_dir():
        raise DataError(f"{path} not found or not a folder: expected {layout}")


def _entries(folder: Path) -> list[str]:
    """Sorted names in ``folder``, hidden ones (.DS_Store, partial downloads) left out."""
    return sorted(name for name in os.listdir(folder) if not name.startswith("."))


def _stems(folder: Path, names: Iterable[str], extensions: tuple[str, ...]) -> dict[str, str]:
    stems: dict[str, str] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions:
            raise DataError(f"{folder / name}: unexpected file (expected {', '.join(extensions)} files); "
                            f"move it out of {folder}")
        if stem in stems:
            raise DataError(f"{folder}: {stems[stem]} and {name} have the same name; keep one of them")
        stems[stem] = name
    return stems


def _numbered(folder: Path, extension: str) -> set[int]:
    numbers = set()
    for name in _entries(folder):
        stem, ext = os.path.splitext(name)
        if ext != extension or not stem.isdigit():
            raise DataError(f"{folder / name}: unexpected file in a five-crop set (expected {{i}}{extension})")
        numbers.add(int(stem))
    return numbers


def _pair(image_dir: Path, label_dir: Path, images: list[str], labels: list[str], list_file: Path,
          layout: str) -> list[Sample]:
    """Samples of listed files; every listed image and label must exist."""
    present_images, present_labels = set(os.listdir(image_dir)), set(os.listdir(label_dir))
    for image, label in zip(images, labels):
        if image not in present_images:
            if label in present_labels:
                raise DataError(f"{label_dir / label} has no image {image_dir / image} (listed in {list_file}); "
                                f"expected {layout}")
            raise DataError(f"{image_dir / image} (listed in {list_file}) not found; expected {layout}")
        if label not in present_labels:
            raise DataError(f"{image_dir / image} has no label {label_dir / label} (listed in {list_file}); "
                            f"expected {layout}")
    return [Sample(image_dir / i, label_dir / lab) for i, lab in zip(images, labels)]


def _check_orphans(image_dir: Path, label_dir: Path, image_keys: list[str], label_keys: list[str],
                   image_suffix: str, label_suffix: str, layout: str,
                   image_names: Optional[dict[str, str]] = None) -> None:
    """Every image key needs a label key and every label key an image key."""
    image_set, label_set = set(image_keys), set(label_keys)
    orphan_labels, orphan_images = sorted(label_set - image_set), sorted(image_set - label_set)
    if orphan_labels:
        key = orphan_labels[0]
        raise DataError(f"{label_dir / (key + label_suffix)} has no image in {image_dir} "
                        f"({len(orphan_labels)} label(s) without image); expected {layout}")
    if orphan_images:
        key = orphan_images[0]
        name = image_names[key] if image_names else key + image_suffix
        raise DataError(f"{image_dir / name} has no label {label_dir / (key + label_suffix)} "
                        f"({len(orphan_images)} image(s) without label); expected {layout}")
