"""The five-crop preprocessing (dataset/crop.py and the crop_datasets.py script) on a tiny COCO-Stuff fixture."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset import build_dataset, five_crop_dir
from dataset.crop import write_five_crops
from dataset.crop_datasets import main as crop_main
from tests.world import run_program
from utils.cli import run_main
from config import DatasetConfig
from utils.errors import DataError

H, W = 8, 12  # source size; crops of ratio 0.5 are 4 x 6
FINE_PERSON, FINE_SKY = 0, 156  # coarse 9 and 23


def _source_label(seed: int) -> np.ndarray:
    label = np.where(np.random.default_rng(seed).random((H, W)) < 0.5, FINE_PERSON, FINE_SKY).astype(np.uint8)
    label[0, 0] = 255
    return label


@pytest.fixture
def coco(tmp_path) -> Path:
    root = tmp_path / "cocostuff"
    lists = {"train2017": ("Coco164kFull_Stuff_Coarse.txt", ["a", "b"]),
             "val2017": ("Coco164kFull_Stuff_Coarse_7.txt", ["v"])}
    for seed, (split, (list_name, ids)) in enumerate(lists.items()):
        for offset, image_id in enumerate(ids):
            for sub in ("images", "annotations", "curated"):
                (root / sub / split).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (W, H), (200, 30, 30)).save(root / "images" / split / f"{image_id}.jpg")
            Image.fromarray(_source_label(10 * seed + offset)).save(root / "annotations" / split / f"{image_id}.png")
        (root / "curated" / split / list_name).write_text("\n".join(ids))
    return root


def _cfg(root: Path, **kw) -> DatasetConfig:
    kw = {"crop_ratio": 0.5, "res": 4, "loader_crop_type": "center", **kw}
    return DatasetConfig(data_type="cocostuff27", data_path=str(root), **kw)


def _crop_files(root: Path) -> dict[str, bytes]:
    folder = five_crop_dir(_cfg(root))
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_five_crops_per_image_for_train_and_val(coco):
    write_five_crops(_cfg(coco))
    folder = five_crop_dir(_cfg(coco))
    counts = [len(list((folder / kind / split).iterdir())) for kind in ("img", "label") for split in ("train", "val")]
    assert counts == [10, 5, 10, 5]


def test_crops_have_crop_ratio_of_each_side(coco):
    write_five_crops(_cfg(coco))
    assert Image.open(five_crop_dir(_cfg(coco)) / "img" / "train" / "0.jpg").size == (W // 2, H // 2)


def test_label_crops_store_coarse_class_plus_one_in_five_crop_order(coco):
    write_five_crops(_cfg(coco))
    coarse = np.where(_source_label(1) == FINE_PERSON, 9 + 1, 23 + 1)  # image "b" = train item 1
    coarse[0, 0] = 0
    h, w = H // 2, W // 2
    windows = [(0, 0), (0, W - w), (H - h, 0), (H - h, W - w), ((H - h) // 2, (W - w) // 2)]  # tl, tr, bl, br, centre
    labels = five_crop_dir(_cfg(coco)) / "label" / "train"
    stored = [np.array(Image.open(labels / f"{5 + k}.png")) for k in range(5)]
    assert all(np.array_equal(s, coarse[t:t + h, left:left + w]) for s, (t, left) in zip(stored, windows))


def test_training_set_reads_the_written_crops(coco):
    write_five_crops(_cfg(coco))
    ds = build_dataset(_cfg(coco), "train")
    assert (len(ds), set(ds[0]["label"].unique().tolist()) <= {-1, 9, 23}) == (10, True)


def test_complete_set_is_skipped(coco):
    write_five_crops(_cfg(coco))
    assert [r.written for r in write_five_crops(_cfg(coco))] == [0, 0]


def test_interrupted_run_is_completed_by_the_next(coco):
    write_five_crops(_cfg(coco))
    before = _crop_files(coco)
    (five_crop_dir(_cfg(coco)) / "img" / "train" / "7.jpg").unlink()
    (five_crop_dir(_cfg(coco)) / "label" / "train" / ".7.png.partial").write_bytes(b"half")  # left by a kill
    reports = write_five_crops(_cfg(coco))
    assert ([r.written for r in reports], _crop_files(coco)) == ([1, 0], before)


def test_worker_processes_write_the_same_files_as_one_process(coco, tmp_path):
    write_five_crops(_cfg(coco), num_workers=2)
    parallel = _crop_files(coco)
    for f in five_crop_dir(_cfg(coco)).rglob("*.*"):
        f.unlink()
    write_five_crops(_cfg(coco), num_workers=0)
    assert _crop_files(coco) == parallel


def test_surplus_crops_fail_the_count_check(coco):
    write_five_crops(_cfg(coco))
    folder = five_crop_dir(_cfg(coco))
    (folder / "img" / "val" / "5.jpg").write_bytes((folder / "img" / "val" / "0.jpg").read_bytes())
    (folder / "label" / "val" / "5.png").write_bytes((folder / "label" / "val" / "0.png").read_bytes())
    with pytest.raises(DataError, match="6 crops for val, expected 5"):
        write_five_crops(_cfg(coco))


def test_types_without_five_crop_sets_are_refused(tmp_path):
    with pytest.raises(DataError, match="only used by cocostuff27 and cityscapes"):
        write_five_crops(DatasetConfig(data_type="potsdam", data_path=str(tmp_path)))


def _option_file(tmp_path: Path, data_path: str) -> Path:
    option_file = tmp_path / "options.json"
    option_file.write_text(json.dumps({"dataset": {"data_type": "cocostuff27", "data_path": data_path}}))
    return option_file


def test_script_writes_the_set_with_a_data_path_override(coco, tmp_path):
    option_file = _option_file(tmp_path, "elsewhere")
    (ended,) = run_program("dataset/crop_datasets.py", ["--opt", str(option_file), "--num_workers", "0",
                                                        f"dataset.data_path={coco}"], tmp_path / "console")
    assert (ended.status, len(_crop_files(coco))) == (0, 30), ended.err


def test_script_reports_a_missing_dataset_in_one_line_with_status_2(tmp_path, capsys):
    status = run_main(crop_main, ["--opt", str(_option_file(tmp_path, str(tmp_path / "nowhere")))])
    err = capsys.readouterr().err
    assert (status, err.count("\n"), "nowhere not found" in err) == (2, 1, True)


def test_a_crop_an_interrupted_run_was_writing_is_removed_on_the_next_run(coco):
    write_five_crops(_cfg(coco))
    folder = five_crop_dir(_cfg(coco)) / "img" / "train"
    partial = folder / ".3.jpg.partial"
    partial.write_bytes(b"half a jpeg")
    write_five_crops(_cfg(coco))
    assert not partial.exists()
