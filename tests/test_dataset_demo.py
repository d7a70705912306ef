"""The synthetic demo set: layout, determinism, separable classes, atomic generation."""
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset.demo as demo
from dataset import build_dataset, n_classes
from dataset.demo import (DEMO_CLASS_NAMES, DEMO_INFO, DEMO_MAX_SIDE, DEMO_MIN_SIDE, demo_scene, ensure_demo_data)
from config import DatasetConfig
from utils.errors import DataError

SMALL = {"train": 3, "val": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generated_set_has_the_directory_layout_and_counts(tmp_path):
    root = ensure_demo_data(tmp_path / "demo", splits=SMALL)
    counts = [len(list((root / kind / split).iterdir())) for kind in ("imgs", "labels") for split in SMALL]
    assert counts == [3, 2, 3, 2]


def test_same_seed_gives_identical_files(tmp_path):
    first = ensure_demo_data(tmp_path / "one", seed=4, splits=SMALL)
    second = ensure_demo_data(tmp_path / "two", seed=4, splits=SMALL)
    assert _files(first) == _files(second)


def test_different_seeds_give_different_scenes():
    assert not np.array_equal(demo_scene(0, "train", 0)[1], demo_scene(1, "train", 0)[1])


def test_train_and_val_scenes_differ():
    assert not np.array_equal(demo_scene(0, "train", 0)[1], demo_scene(0, "val", 0)[1])


def test_image_sides_lie_in_the_demo_range():
    sides = [s for i in range(20) for s in demo_scene(0, "train", i)[1].shape]
    assert DEMO_MIN_SIDE <= min(sides) and max(sides) <= DEMO_MAX_SIDE


def test_every_class_appears_in_twenty_scenes():
    present = set(np.unique(np.concatenate([demo_scene(0, "train", i)[1].ravel() for i in range(20)])).tolist())
    assert present == set(range(len(DEMO_CLASS_NAMES)))


def test_classes_differ_in_mean_colour():
    sums = {c: [np.zeros(3), 0] for c in range(len(DEMO_CLASS_NAMES))}
    for i in range(20):
        image, label = demo_scene(0, "train", i)
        for c in np.unique(label):
            sums[c][0] += image[label == c].sum(0)
            sums[c][1] += (label == c).sum()
    means = [total / count for total, count in sums.values()]
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(means, 2)) > 25


def test_label_pngs_hold_class_ids(tmp_path):
    root = ensure_demo_data(tmp_path / "demo", splits=SMALL)
    label = np.array(Image.open(root / "labels" / "train" / "0000.png"))
    assert label.max() < len(DEMO_CLASS_NAMES)


def test_existing_set_is_reused_without_regenerating(tmp_path, monkeypatch):
    root = ensure_demo_data(tmp_path / "demo", splits=SMALL)
    monkeypatch.setattr(demo, "generate_demo_data", lambda *a, **k: pytest.fail("regenerated"))
    assert ensure_demo_data(root, splits=SMALL) == root


def test_interrupted_generation_leaves_no_set_behind(tmp_path, monkeypatch):
    calls = itertools.count()

    def failing_scene(*args):
        if next(calls) == 2:
            raise KeyboardInterrupt
        return demo_scene(*args)

    monkeypatch.setattr(demo, "demo_scene", failing_scene)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_data(tmp_path / "demo", splits=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [".demo.lock"]  # the lock file stays, released and harmless


def test_empty_existing_folder_is_filled(tmp_path):
    (tmp_path / "demo").mkdir()
    assert (ensure_demo_data(tmp_path / "demo", splits=SMALL) / DEMO_INFO).is_file()


def test_folder_with_other_content_is_refused(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="holds no demo set"):
        ensure_demo_data(tmp_path / "demo", splits=SMALL)


def test_set_made_with_another_seed_is_refused(tmp_path):
    ensure_demo_data(tmp_path / "demo", seed=1, splits=SMALL)
    with pytest.raises(DataError, match="holds a demo set made with"):
        ensure_demo_data(tmp_path / "demo", seed=2, splits=SMALL)


def test_demo_type_has_its_fixed_class_count():
    assert n_classes(DatasetConfig(data_type="demo", data_path="unused")) == len(DEMO_CLASS_NAMES)


@pytest.mark.slow
def test_build_dataset_generates_the_demo_set_on_first_use(tmp_path):
    ds = build_dataset(DatasetConfig(data_type="demo", data_path=str(tmp_path / "demo")), "train")
    assert (len(ds), (tmp_path / "demo" / DEMO_INFO).is_file()) == (200, True)
