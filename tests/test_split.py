"""``eval.split``: eval.py and a run's final evaluation report on val (the default) or on a 'directory' set's test
split, which chose nothing; a split that is not there is one line and exit status 2, never a fallback to val."""
import importlib
import json
import shutil
from pathlib import Path

import pytest

import run
from config import DATA_TYPES, DatasetConfig
from dataset import build_dataset
from tests.conftest import random_checkpoint, tiny_options
from utils.cli import run_main
from utils.errors import DataError

pytestmark = pytest.mark.usefixtures("shallow_vit")

eval_script = importlib.import_module("eval")
N_TEST = 3  # test images of split_data; its val split has 4, so a report's n_images tells the two apart


@pytest.fixture(scope="module")
def split_data(tiny_data, tmp_path_factory) -> Path:
    """``tiny_data`` with a test split: imgs/test and labels/test, three images (copies of training images)."""
    root = tmp_path_factory.mktemp("split_data") / "data"
    shutil.copytree(tiny_data, root)
    for folder in ("imgs", "labels"):
        (root / folder / "test").mkdir()
        for name in sorted(p.name for p in (root / folder / "train").iterdir())[:N_TEST]:
            shutil.copyfile(root / folder / "train" / name, root / folder / "test" / name)
    return root


@pytest.fixture(scope="module")
def checkpoint(split_data, tmp_path_factory) -> Path:
    """A random checkpoint that carries the tiny options on ``split_data``."""
    folder = tmp_path_factory.mktemp("split_ckpt")
    return random_checkpoint(tiny_options(folder, split_data), folder / "last.pth")


def _eval(checkpoint: Path, out: Path, *overrides: str) -> int:
    return run_main(eval_script.main, ["--checkpoint", str(checkpoint), "--debug", "--out", str(out), *overrides])


def _refusal(capsys) -> str:
    """The one line on stderr of a refused command."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_the_directory_test_split_is_read_from_imgs_test_and_labels_test(split_data):
    cfg = DatasetConfig(data_type="directory", data_path=str(split_data), n_classes=3)
    test_set = build_dataset(cfg, "test", 64)
    assert len(test_set) == N_TEST
    assert {s.image.parent for s in test_set.samples} == {split_data / "imgs" / "test"}
    assert {s.label.parent for s in test_set.samples} == {split_data / "labels" / "test"}
    assert test_set[0]["img"].shape[-2:] == (64, 64)  # the evaluation transform at eval.res


def test_eval_split_test_reports_on_the_test_images(checkpoint, tmp_path, capsys):
    assert _eval(checkpoint, tmp_path, "eval.split=test") == 0
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert (report["split"], report["n_images"]) == ("test", N_TEST)
    assert f"{N_TEST} images of directory test, " in capsys.readouterr().out


def test_the_default_split_is_val(checkpoint, tmp_path, capsys):
    assert _eval(checkpoint, tmp_path) == 0
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert (report["split"], report["n_images"]) == ("val", 4)
    assert "4 images of directory val, " in capsys.readouterr().out


def test_beside_the_checkpoint_the_test_report_keeps_the_val_report(checkpoint, tmp_path):
    ckpt = shutil.copyfile(checkpoint, tmp_path / "best.pth")
    for split in ("val", "test"):
        assert run_main(eval_script.main, ["--checkpoint", str(ckpt), "--debug", f"eval.split={split}"]) == 0
    val, test = (json.loads((tmp_path / name).read_text())
                 for name in ("best_eval_report.json", "best_test_eval_report.json"))
    assert (val["split"], val["n_images"], test["split"], test["n_images"]) == ("val", 4, "test", N_TEST)


def test_a_directory_set_without_imgs_test_is_refused(checkpoint, tiny_data, tmp_path, capsys):
    assert _eval(checkpoint, tmp_path, "eval.split=test", f"dataset.data_path={tiny_data}") == 2
    assert f"{tiny_data / 'imgs' / 'test'} not found" in _refusal(capsys)
    assert not (tmp_path / "eval_report.json").exists()


def test_a_labelled_set_without_labels_test_is_refused(checkpoint, split_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(split_data, data)
    shutil.rmtree(data / "labels" / "test")
    assert _eval(checkpoint, tmp_path / "out", "eval.split=test", f"dataset.data_path={data}") == 2
    assert f"{data / 'labels' / 'test'} not found" in _refusal(capsys)


def test_an_empty_imgs_test_is_refused_with_the_test_layout(checkpoint, split_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(split_data, data)
    for path in (data / "imgs" / "test").iterdir():
        path.unlink()
    assert _eval(checkpoint, tmp_path / "out", "eval.split=test", f"dataset.data_path={data}") == 2
    line = _refusal(capsys)
    assert f"{data / 'imgs' / 'test'} holds no images; expected data_path/imgs/test/NAME.jpg" in line
    assert "{train,val}" not in line


def test_the_demo_set_has_no_test_split(checkpoint, tmp_path, capsys):
    demo = tmp_path / "demo"
    assert _eval(checkpoint, tmp_path / "out", "eval.split=test", "dataset.data_type=demo",
                 "dataset.n_classes=null", "dataset.class_names=null", f"dataset.data_path={demo}") == 2
    assert "dataset.data_type 'demo' has no separate test split" in _refusal(capsys)
    assert not demo.exists()  # refused before the demo set is generated


@pytest.mark.parametrize("data_type", [t for t in DATA_TYPES if t != "directory"])
def test_only_the_directory_layout_has_a_test_split(data_type, tmp_path):
    cfg = DatasetConfig(data_type=data_type, data_path=str(tmp_path))
    with pytest.raises(DataError, match=f"dataset.data_type '{data_type}' has no separate test split"):
        build_dataset(cfg, "test")


def test_an_unknown_split_is_refused_naming_the_choices(checkpoint, tmp_path, capsys):
    assert _eval(checkpoint, tmp_path, "eval.split=train") == 2
    assert "split must be one of 'val', 'test' (got 'train')" in _refusal(capsys)


def test_run_refuses_a_missing_test_split_before_it_trains(tiny_data, tmp_path, capsys):
    options = tiny_options(tmp_path, tiny_data)
    assert run_main(run.main, ["--opt", str(options), "--debug", "eval.split=test"]) == 2
    assert f"{tiny_data / 'imgs' / 'test'} not found" in _refusal(capsys)
    assert not (tmp_path / "output" / "tiny" / "last.pth").exists()


def test_the_final_evaluation_of_a_run_scores_the_test_images(split_data, tmp_path, capsys):
    options = tiny_options(tmp_path, split_data)
    assert run_main(run.main, ["--opt", str(options), "--debug", "eval.split=test"]) == 0
    run_dir = tmp_path / "output" / "tiny"
    for stem in ("best", "last"):
        report = json.loads((run_dir / f"{stem}_eval_report.json").read_text())
        assert (report["split"], report["n_images"]) == ("test", N_TEST), stem
    assert set(json.loads((run_dir / "final_metrics.json").read_text())) >= {"best", "last"}
    assert f"{N_TEST} images of directory test, " in capsys.readouterr().out
