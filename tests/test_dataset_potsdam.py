"""Potsdam and Potsdam raw (.mat files) on tiny fixtures."""
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from dataset import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from config import DatasetConfig
from utils.errors import DataError

SIDE = 7
FINE = [0, 1, 2, 3, 4, 5, 255]  # impervious, building, low vegetation, tree, car, clutter, unlabelled
RGB = (200, 100, 50)


def _mat_pair(image_dir: Path, label_dir: Path, name: str, gt_row=FINE) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    img = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    img[..., :3] = RGB
    img[..., 3] = 255  # infrared, dropped by the loader
    savemat(image_dir / name, {"img": img})
    savemat(label_dir / name, {"gt": np.tile(np.array(gt_row, dtype=np.uint8), (SIDE, 1))})


@pytest.fixture
def potsdam(tmp_path) -> Path:
    root = tmp_path / "potsdam"
    for name in ("t1", "t2", "v1"):
        _mat_pair(root / "imgs", root / "gt", f"{name}.mat")
    (root / "labelled_train.txt").write_text("t1\nt2\n")
    (root / "labelled_test.txt").write_text("v1\n")
    return root


@pytest.fixture
def potsdamraw(tmp_path) -> Path:
    root = tmp_path / "potsdamraw"
    for name in ("0_0_2", "0_0_10", "1_0_0", "0_1_0"):
        _mat_pair(root / "processed" / "imgs", root / "processed" / "gt", f"{name}.mat")
    return root


def _cfg(root: Path, data_type: str = "potsdam") -> DatasetConfig:
    return DatasetConfig(data_type=data_type, data_path=str(root), res=SIDE, loader_crop_type="center", crop_type=None)


def test_potsdam_merges_six_classes_into_three_and_ignores_255(potsdam):
    assert build_dataset(_cfg(potsdam), "train")[0]["label"][0].tolist() == [0, 1, 2, 2, 0, 1, -1]


def test_potsdam_train_reads_labelled_train(potsdam):
    assert [s.image.name for s in build_dataset(_cfg(potsdam), "train").samples] == ["t1.mat", "t2.mat"]


def test_potsdam_val_reads_labelled_test(potsdam):
    assert [s.image.name for s in build_dataset(_cfg(potsdam), "val").samples] == ["v1.mat"]


def test_potsdam_image_is_the_first_three_channels(potsdam):
    img = build_dataset(_cfg(potsdam), "train")[0]["img"]
    rgb = img[:, 0, 0] * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)
    assert torch.allclose(rgb * 255, torch.tensor(RGB, dtype=torch.float32), atol=1e-3)


def test_potsdam_class_outside_0_to_5_raises(potsdam):
    _mat_pair(potsdam / "imgs", potsdam / "gt", "t1.mat", gt_row=[6] * SIDE)
    with pytest.raises(DataError, match=r"t1\.mat: label value\(s\) 6 outside"):
        build_dataset(_cfg(potsdam), "train")[0]


def test_potsdam_image_without_gt_raises_when_built(potsdam):
    (potsdam / "gt" / "t2.mat").unlink()
    with pytest.raises(DataError, match=r"t2\.mat has no label"):
        build_dataset(_cfg(potsdam), "train")


def test_potsdam_missing_split_file_raises_naming_it(potsdam):
    (potsdam / "labelled_test.txt").unlink()
    with pytest.raises(DataError, match=r"labelled_test\.txt not found"):
        build_dataset(_cfg(potsdam), "val")


def test_potsdam_mat_without_img_key_raises_naming_the_key(potsdam):
    savemat(potsdam / "imgs" / "v1.mat", {"image": np.zeros((SIDE, SIDE, 3), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"v1\.mat: no variable 'img'"):
        build_dataset(_cfg(potsdam), "val")[0]


def test_potsdamraw_lists_tiles_in_numeric_order(potsdamraw):
    names = [s.image.name for s in build_dataset(_cfg(potsdamraw, "potsdamraw"), "train").samples]
    assert names == ["0_0_2.mat", "0_0_10.mat", "0_1_0.mat", "1_0_0.mat"]


def test_potsdamraw_maps_labels_like_potsdam(potsdamraw):
    assert build_dataset(_cfg(potsdamraw, "potsdamraw"), "train")[0]["label"][0].tolist() == [0, 1, 2, 2, 0, 1, -1]


def test_potsdamraw_unexpected_file_raises(potsdamraw):
    (potsdamraw / "processed" / "imgs" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: unexpected file"):
        build_dataset(_cfg(potsdamraw, "potsdamraw"), "train")


def test_potsdamraw_gt_without_image_raises_when_built(potsdamraw):
    (potsdamraw / "processed" / "imgs" / "1_0_0.mat").unlink()
    with pytest.raises(DataError, match=r"gt/1_0_0\.mat has no image"):
        build_dataset(_cfg(potsdamraw, "potsdamraw"), "train")
