"""Cityscapes (torchvision layout, gtFine labelIds) and its five-crop training set, on tiny fixtures."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import build_dataset
from config import DatasetConfig
from utils.errors import DataError

SIDE = 6
LABEL_IDS = [0, 6, 7, 8, 20, 33]  # void, void, road, sidewalk, traffic sign, bicycle


def _add(root: Path, split: str, city: str, stem: str, label_ids=LABEL_IDS) -> None:
    image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIDE, SIDE), (10, 20, 30)).save(image_dir / f"{stem}_leftImg8bit.png")
    label = np.tile(np.array(label_ids, dtype=np.uint8), (SIDE, 1))
    Image.fromarray(label).save(label_dir / f"{stem}_gtFine_labelIds.png")
    Image.new("RGB", (SIDE, SIDE)).save(label_dir / f"{stem}_gtFine_color.png")  # other gtFine files are ignored


@pytest.fixture
def cityscapes(tmp_path) -> Path:
    root = tmp_path / "cityscapes"
    _add(root, "train", "bochum", "bochum_000000_000313")
    _add(root, "train", "aachen", "aachen_000000_000019")
    _add(root, "val", "frankfurt", "frankfurt_000000_000294")
    return root


def _cfg(root: Path, **kw) -> DatasetConfig:
    kw = {"res": SIDE, "loader_crop_type": "center", "crop_type": None, **kw}
    return DatasetConfig(data_type="cityscapes", data_path=str(root), **kw)


def test_label_ids_become_class_ids_minus_7_with_void_ignored(cityscapes):
    label = build_dataset(_cfg(cityscapes), "train")[0]["label"]
    assert label[0].tolist() == [-1, -1, 0, 1, 13, 26]


def test_images_are_listed_city_by_city_in_sorted_order(cityscapes):
    names = [s.image.parent.name for s in build_dataset(_cfg(cityscapes), "train").samples]
    assert names == ["aachen", "bochum"]


def test_val_reads_the_val_split(cityscapes):
    assert len(build_dataset(_cfg(cityscapes), "val")) == 1


def test_label_id_above_33_raises(cityscapes):
    _add(cityscapes, "val", "frankfurt", "frankfurt_000000_000294", label_ids=[34] * SIDE)
    with pytest.raises(DataError, match=r"label value\(s\) 34 outside the known range \(Cityscapes labelIds 0\.\.33\)"):
        build_dataset(_cfg(cityscapes), "val")[0]


def test_image_without_its_label_raises_when_built(cityscapes):
    (cityscapes / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DataError, match=r"aachen_000000_000019_leftImg8bit\.png has no label"):
        build_dataset(_cfg(cityscapes), "train")


def test_label_without_its_image_raises_when_built(cityscapes):
    (cityscapes / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png").unlink()
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelIds\.png has no image"):
        build_dataset(_cfg(cityscapes), "train")


def test_missing_gtfine_folder_raises_naming_the_layout(cityscapes):
    (cityscapes / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png").unlink()
    (cityscapes / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_color.png").unlink()
    (cityscapes / "gtFine" / "val" / "frankfurt").rmdir()
    (cityscapes / "gtFine" / "val").rmdir()
    with pytest.raises(DataError, match=r"gtFine/val not found.*torchvision's Cityscapes layout"):
        build_dataset(_cfg(cityscapes), "val")


def test_five_crop_training_reads_the_cropped_set_with_labels_stored_plus_one(cityscapes):
    crop_root = cityscapes / "cropped" / "cityscapes_five_crop_0.5"
    (crop_root / "img" / "train").mkdir(parents=True)
    (crop_root / "label" / "train").mkdir(parents=True)
    Image.new("RGB", (SIDE, SIDE)).save(crop_root / "img" / "train" / "0.jpg")
    Image.fromarray(np.tile(np.array([0, 1, 2, 27, 27, 27], dtype=np.uint8), (SIDE, 1))).save(
        crop_root / "label" / "train" / "0.png")
    label = build_dataset(_cfg(cityscapes, crop_type="five"), "train")[0]["label"]
    assert label[0].tolist() == [-1, 0, 1, 26, 26, 26]
