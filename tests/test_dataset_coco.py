"""COCO-Stuff (cocostuff27 / 15 / 3) on a tiny on-disk fixture with known fine ids."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from config import DatasetConfig
from utils.errors import DataError

SIDE = 8  # fixture images are SIDE x SIDE and res = SIDE, so training transforms keep every pixel
# row 0: things and the wall/water/window/solid ids; row 1: unlabelled, sky, plant, ground, textile, a thing...
ROW0 = [0, 1, 8, 170, 176, 177, 179, 181]
ROW1 = [255, 105, 123, 110, 91, 12, 156, 168]


def _label(rows=(ROW0, ROW1)) -> np.ndarray:
    label = np.zeros((SIDE, SIDE), dtype=np.uint8)
    for i, row in enumerate(rows):
        label[i] = row
    return label


def _add(root: Path, split: str, image_id: str, label: np.ndarray) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", label.shape[::-1], (90, 120, 30)).save(root / "images" / split / f"{image_id}.jpg")
    Image.fromarray(label).save(root / "annotations" / split / f"{image_id}.png")


def _lists(root: Path, split: str, lists: dict) -> None:
    (root / "curated" / split).mkdir(parents=True, exist_ok=True)
    for name, ids in lists.items():
        (root / "curated" / split / name).write_text("".join(f"{i}\n" for i in ids))


@pytest.fixture
def coco(tmp_path) -> Path:
    root = tmp_path / "cocostuff"
    _add(root, "train2017", "a", _label())
    _add(root, "train2017", "b", _label())
    _add(root, "val2017", "v", _label())
    _lists(root, "train2017", {"Coco164kFull_Stuff_Coarse.txt": ["a", "b"], "Coco164kFull_Stuff_Coarse_7.txt": ["a"],
                               "Coco164kFew_Stuff_6.txt": ["b"]})
    _lists(root, "val2017", {"Coco164kFull_Stuff_Coarse_7.txt": ["v"], "Coco164kFew_Stuff_6.txt": ["v"]})
    return root


def _cfg(root: Path, data_type: str = "cocostuff27", **kw) -> DatasetConfig:
    kw = {"res": SIDE, "loader_crop_type": "center", "crop_type": None, **kw}
    return DatasetConfig(data_type=data_type, data_path=str(root), **kw)


def test_cocostuff27_maps_fine_ids_to_the_coarse_classes(coco):
    label = build_dataset(_cfg(coco), "train")[0]["label"]
    assert label[0].tolist() == [9, 11, 11, 18, 18, 26, 19, 24]


def test_cocostuff27_maps_unlabelled_255_to_ignore(coco):
    assert build_dataset(_cfg(coco), "train")[0]["label"][1, 0].item() == -1


def test_cocostuff15_keeps_stuff_classes_shifted_by_12_and_ignores_things(coco):
    label = build_dataset(_cfg(coco, "cocostuff15"), "train")[0]["label"]
    assert label[1].tolist() == [-1, 11, 10, 9, 5, -1, 11, 10]


def test_cocostuff3_maps_sky_plant_ground_to_0_1_2_and_ignores_the_rest(coco):
    label = build_dataset(_cfg(coco, "cocostuff3"), "train")[0]["label"]
    assert label[1].tolist() == [-1, 0, 1, 2, -1, -1, 0, 1]


def test_cocostuff27_train_reads_the_full_image_list(coco):
    assert len(build_dataset(_cfg(coco), "train")) == 2


def test_cocostuff27_val_reads_the_coarse_7_list(coco):
    assert [s.image.name for s in build_dataset(_cfg(coco), "val").samples] == ["v.jpg"]


def test_cocostuff3_reads_the_few_6_list(coco):
    assert [s.image.name for s in build_dataset(_cfg(coco, "cocostuff3"), "train").samples] == ["b.jpg"]


def test_items_hold_index_normalised_image_and_label(coco):
    item = build_dataset(_cfg(coco), "train")[1]
    assert (item["ind"], tuple(item["img"].shape), tuple(item["label"].shape)) == (1, (3, SIDE, SIDE), (SIDE, SIDE))


def test_dataset_reports_its_class_count(coco):
    assert build_dataset(_cfg(coco, "cocostuff15"), "val").n_classes == 15


def test_eval_transform_keeps_image_and_label_aligned(tmp_path):
    root = tmp_path / "coco"
    label = np.zeros((16, 24), dtype=np.uint8)
    label[:, 12:] = 181  # left half person (coarse 9), right half solid (coarse 24)
    _add(root, "val2017", "v", label)
    colours = np.zeros((16, 24, 3), dtype=np.uint8)
    colours[:, :12] = (255, 0, 0)
    colours[:, 12:] = (0, 0, 255)
    Image.fromarray(colours).save(root / "images" / "val2017" / "v.jpg", quality=100)
    _lists(root, "val2017", {"Coco164kFull_Stuff_Coarse_7.txt": ["v"]})
    item = build_dataset(_cfg(root), "val")[0]
    red = item["img"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0] > 0.5
    assert np.array_equal(red.numpy(), (item["label"] == 9).numpy())


def test_fine_id_outside_the_table_raises_naming_the_label_file(coco):
    _add(coco, "train2017", "a", _label(([200] * SIDE,)))
    with pytest.raises(DataError, match=r"a\.png: label value\(s\) 200 outside"):
        build_dataset(_cfg(coco), "train")[0]


def test_missing_data_path_raises_naming_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match=r"nowhere not found.*images/\{train2017,val2017\}/ID\.jpg"):
        build_dataset(_cfg(tmp_path / "nowhere"), "train")


def test_missing_image_list_raises_naming_it(coco):
    (coco / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(DataError, match=r"Coco164kFull_Stuff_Coarse_7\.txt not found"):
        build_dataset(_cfg(coco), "val")


def test_empty_image_list_raises(coco):
    (coco / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        build_dataset(_cfg(coco), "val")


def test_label_without_its_image_raises_when_built(coco):
    (coco / "images" / "train2017" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"b\.png has no image .*b\.jpg"):
        build_dataset(_cfg(coco), "train")


def test_image_without_its_label_raises_when_built(coco):
    (coco / "annotations" / "train2017" / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.jpg has no label .*a\.png"):
        build_dataset(_cfg(coco), "train")


def test_corrupt_image_raises_naming_the_file(coco):
    (coco / "images" / "train2017" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=r"a\.jpg: cannot read the image"):
        build_dataset(_cfg(coco), "train")[0]


def test_label_of_another_size_than_its_image_raises(coco):
    Image.fromarray(np.zeros((SIDE, SIDE + 1), dtype=np.uint8)).save(coco / "annotations" / "train2017" / "a.png")
    with pytest.raises(DataError, match="must have the same size"):
        build_dataset(_cfg(coco), "train")[0]


def test_val_ignores_crop_type_five(coco):
    assert len(build_dataset(_cfg(coco, crop_type="five"), "val")) == 1


def test_cocostuff15_training_ignores_crop_type_five(coco):
    assert len(build_dataset(_cfg(coco, "cocostuff15", crop_type="five"), "train")) == 1


def test_five_crop_training_without_the_cropped_set_says_how_to_make_it(coco):
    with pytest.raises(DataError, match=r"cocostuff27_five_crop_0\.5/img/train not found.*crop_datasets\.py"):
        build_dataset(_cfg(coco, crop_type="five"), "train")
