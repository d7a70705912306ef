"""The 'directory' format: the real CamVid set (shared folder) and tiny fixtures for each mistake."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from dataset import IMAGENET_MEAN, IMAGENET_STD, build_dataset, require_labels
from config import DatasetConfig
from utils.errors import DataError

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "camvid"
CAMVID_CLASSES = 11  # sky, building, pole, road, pavement, tree, sign, fence, car, pedestrian, bicyclist
CAMVID_SKY = 0


@pytest.fixture(scope="module")
def camvid() -> Path:
    if not (CAMVID / "imgs").is_dir():
        pytest.fail(f"the shared CamVid set is missing: expected {CAMVID}/imgs and {CAMVID}/labels "
                    f"(the shared folder sits beside the project root)")
    return CAMVID


def _camvid_cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(data_type="directory", data_path=str(root), n_classes=CAMVID_CLASSES, **kw)


def test_camvid_val_labels_equal_the_pngs_resized_and_center_cropped(camvid):
    ds = build_dataset(_camvid_cfg(camvid), "val")
    reference = T.Compose([T.Resize(320, T.InterpolationMode.NEAREST), T.CenterCrop(320)])
    for index in (0, 50, 100):
        expected = np.asarray(reference(Image.open(ds.samples[index].label))).astype(np.int64)
        expected[expected == 255] = -1
        assert np.array_equal(ds[index]["label"].numpy(), expected)


def test_camvid_labels_stay_within_the_11_classes_and_ignore(camvid):
    ds = build_dataset(_camvid_cfg(camvid), "train")
    values = torch.cat([ds[i]["label"].unique() for i in (0, 100, 200)])
    assert values.min() >= -1 and values.max() < CAMVID_CLASSES


def test_camvid_sky_is_brighter_than_the_rest_after_a_random_crop(camvid):
    torch.manual_seed(0)
    ds = build_dataset(_camvid_cfg(camvid, loader_crop_type="random", res=224), "train")
    item = ds[3]
    std, mean = torch.tensor(IMAGENET_STD)[:, None, None], torch.tensor(IMAGENET_MEAN)[:, None, None]
    brightness = (item["img"] * std + mean).mean(0)
    sky = item["label"] == CAMVID_SKY
    assert brightness[sky].mean() > brightness[~sky].mean() + 0.2


def test_camvid_train_has_every_image(camvid):
    assert len(build_dataset(_camvid_cfg(camvid), "train")) == len(list((camvid / "imgs" / "train").iterdir()))


def _write(root: Path, split: str, name: str, label, image_ext: str = ".png") -> None:
    (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
    label = np.asarray(label, dtype=np.uint8)
    shown = np.repeat((label * 40).astype(np.uint8)[..., None], 3, axis=2)  # red = 40 x class: checks alignment
    Image.fromarray(shown).save(root / "imgs" / split / f"{name}{image_ext}")
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(root / "labels" / split / f"{name}.png")


@pytest.fixture
def mine(tmp_path) -> Path:
    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in ("a", "b"):
            _write(root, split, name, rng.integers(0, 3, (20, 28)))
    return root


def _cfg(root: Path, **kw) -> DatasetConfig:
    kw = {"res": 12, "loader_crop_type": "random", "crop_type": None, "n_classes": 3, **kw}
    return DatasetConfig(data_type="directory", data_path=str(root), **kw)


def test_random_crop_keeps_image_and_label_aligned(mine):
    torch.manual_seed(0)
    item = build_dataset(_cfg(mine), "train")[1]
    red = (item["img"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    assert torch.equal(torch.round(red / 40).long(), item["label"])


def test_value_255_is_ignored(tmp_path):
    _write(tmp_path, "val", "a", [[0, 255], [1, 2]])
    assert build_dataset(_cfg(tmp_path), "val")[0]["label"].min() == -1


def test_label_value_at_or_above_n_classes_raises(mine):
    _write(mine, "train", "a", [[0, 3], [1, 2]])
    with pytest.raises(DataError, match=r"a\.png: label value\(s\) 3 outside the known range \(class ids 0\.\.2"):
        build_dataset(_cfg(mine), "train")[0]


def test_images_and_labels_pair_by_name_across_extensions(mine):
    _write(mine, "train", "c", [[1, 1], [1, 1]], image_ext=".jpg")
    samples = build_dataset(_cfg(mine), "train").samples
    assert [(s.image.name, s.label.name) for s in samples][-1] == ("c.jpg", "c.png")


@pytest.fixture
def unlabelled(tmp_path) -> Path:
    for split in ("train", "val"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        Image.new("RGB", (16, 12), (9, 9, 9)).save(tmp_path / "imgs" / split / "a.png")
    return tmp_path


def test_set_without_labels_folder_has_no_labels(unlabelled):
    assert not build_dataset(_cfg(unlabelled), "train").has_labels


def test_unlabelled_items_have_all_pixels_ignored(unlabelled):
    assert (build_dataset(_cfg(unlabelled), "train")[0]["label"] == -1).all()


def test_require_labels_explains_that_evaluation_needs_labels(unlabelled):
    with pytest.raises(DataError, match=r"labels not found: evaluation needs one label PNG per image in .*labels/val"):
        require_labels(build_dataset(_cfg(unlabelled), "val"))


def test_require_labels_accepts_a_labelled_set(mine):
    require_labels(build_dataset(_cfg(mine), "val"))


def test_image_without_its_label_raises_when_built(mine):
    (mine / "labels" / "train" / "b.png").unlink()
    with pytest.raises(DataError, match=r"imgs/train/b\.png has no label .*labels/train/b\.png"):
        build_dataset(_cfg(mine), "train")


def test_label_without_its_image_raises_when_built(mine):
    (mine / "imgs" / "val" / "a.png").unlink()
    with pytest.raises(DataError, match=r"labels/val/a\.png has no image"):
        build_dataset(_cfg(mine), "val")


def test_labels_folder_without_the_split_raises(mine):
    for f in (mine / "labels" / "val").iterdir():
        f.unlink()
    (mine / "labels" / "val").rmdir()
    with pytest.raises(DataError, match=r"labels/val not found"):
        build_dataset(_cfg(mine), "val")


def test_missing_image_folder_raises_naming_the_layout(tmp_path):
    with pytest.raises(DataError, match=r"imgs not found or not a folder: expected data_path/imgs/\{train,val\}"):
        build_dataset(_cfg(tmp_path), "train")


def test_empty_image_folder_raises(tmp_path):
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"imgs/train holds no images"):
        build_dataset(_cfg(tmp_path), "train")


def test_non_image_file_among_the_images_raises(mine):
    (mine / "imgs" / "train" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: unexpected file"):
        build_dataset(_cfg(mine), "train")


def test_hidden_files_are_skipped(mine):
    (mine / "imgs" / "train" / ".DS_Store").write_text("x")
    assert len(build_dataset(_cfg(mine), "train")) == 2


def test_colour_label_image_raises(mine):
    Image.new("RGB", (28, 20)).save(mine / "labels" / "train" / "a.png")
    with pytest.raises(DataError, match="single-channel"):
        build_dataset(_cfg(mine), "train")[0]


def test_grayscale_image_gives_three_channels(mine):
    Image.new("L", (28, 20)).save(mine / "imgs" / "train" / "a.png")
    assert build_dataset(_cfg(mine), "train")[0]["img"].shape[0] == 3


def test_data_loader_batches_the_items(mine):
    batch = next(iter(DataLoader(build_dataset(_cfg(mine), "train"), batch_size=2)))
    shapes = (tuple(batch["img"].shape), tuple(batch["label"].shape), batch["ind"].tolist())
    assert shapes == ((2, 3, 12, 12), (2, 12, 12), [0, 1])
