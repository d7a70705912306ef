"""Degenerate data and files: image modes, names, huge images, labels that score nothing, empty checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import run
from dataset import build_dataset
from dataset.base import read_image
from engine.evaluate import Evaluation, Scores, checkpoint_path, save_report
from tests.conftest import tiny_options
from utils.cli import run_main
from config import DatasetConfig, EvalConfig
from utils.errors import DataError, WeightsError
from utils.files import read_torch_file

pytestmark = pytest.mark.usefixtures("shallow_vit")


def save(array: np.ndarray, path: Path, mode: str = None) -> Path:
    Image.fromarray(array, mode).save(path)
    return path


def test_16_bit_grey_image_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(4, axis=0)
    path = save(values, tmp_path / "deep.png")
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    assert np.array_equal(np.asarray(read_image(path))[0, :, 0], [0, 1, 128, 255])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "L", "CMYK", "YCbCr"])
def test_common_modes_read_as_the_rgb_pil_converts_them_to(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    path = tmp_path / ("x.jpg" if mode in ("CMYK", "YCbCr") else "x.png")
    image.save(path, **({"quality": 100} if path.suffix == ".jpg" else {}))
    with Image.open(path) as reopened:
        expected = np.asarray(reopened.convert("RGB"))
    assert np.array_equal(np.asarray(read_image(path)), expected)


def test_floating_point_image_is_refused_with_its_mode(tmp_path):
    path = tmp_path / "x.tiff"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    with pytest.raises(DataError, match=r"x\.tiff: a floating-point image \(mode F\)"):
        read_image(path)


def test_image_beyond_the_decompression_bomb_limit_is_a_data_error(tmp_path, monkeypatch):
    path = save(np.zeros((40, 40, 3), np.uint8), tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"huge\.png: .*decompression bomb.*MAX_IMAGE_PIXELS"):
        read_image(path)


def test_labels_with_an_upper_case_extension_are_read(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        save(np.zeros((32, 32, 3), np.uint8), tmp_path / "imgs" / split / "a.JPG")
        save(np.ones((32, 32), np.uint8), tmp_path / "labels" / split / "a.PNG")
    dataset = build_dataset(DatasetConfig(data_type="directory", data_path=str(tmp_path), n_classes=2), "val")
    assert int(dataset[0]["label"].min()) == 1


@pytest.fixture
def ignored_val(tiny_data, tmp_path) -> Path:
    """The tiny set with validation labels that mark every pixel as ignored (255)."""
    root = tmp_path / "data"
    for kind in ("imgs", "labels"):
        (root / kind).mkdir(parents=True)
        (root / kind / "train").symlink_to(tiny_data / kind / "train", target_is_directory=True)
    (root / "imgs" / "val").symlink_to(tiny_data / "imgs" / "val", target_is_directory=True)
    (root / "labels" / "val").mkdir()
    for image in (tiny_data / "imgs" / "val").iterdir():
        save(np.full((48, 64), 255, np.uint8), root / "labels" / "val" / f"{image.stem}.png")
    return root


def test_training_with_unscorable_validation_labels_keeps_last_pth_and_says_why(ignored_val, tmp_path, caplog):
    options = tiny_options(tmp_path, ignored_val)
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
    run_dir = tmp_path / "output" / "tiny"
    assert "the validation set labels every pixel as ignored" in caplog.text
    assert (run_dir / "last.pth").is_file() and not (run_dir / "best.pth").exists()


def test_evaluating_unscorable_labels_is_one_clear_error(ignored_val, tiny_data, tmp_path, capsys):
    options = tiny_options(tmp_path, tiny_data)
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
    status = run_main(eval_script.main, ["--checkpoint", str(tmp_path / "output" / "tiny" / "last.pth"), "--debug",
                                         "--data_path", str(ignored_val)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "mark every pixel as ignored" in err


def test_report_of_a_class_never_labelled_nor_predicted_holds_null_not_nan(tmp_path):
    scores = Scores.empty(3, EvalConfig(), torch.device("cpu"))
    pred, label = torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, 0]])  # class 2 never appears
    scores.cluster.update(pred, label)
    scores.linear.update(pred, label)
    evaluation = Evaluation(no_crf=scores.compute(), crf=None, loss=float("nan"), n_images=1, examples=[])
    paths = save_report(evaluation, tmp_path, ["a", "b", "c"], np.zeros((3, 3), np.uint8), checkpoint="x")
    report = json.loads(paths["report"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert report["per_class_iou"]["linear"]["c"] is None and report["per_class_iou"]["linear"]["b"] == 50.0


def test_empty_checkpoint_says_it_is_empty(tmp_path):
    (tmp_path / "last.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"last\.pth is empty \(0 bytes\)"):
        read_torch_file(tmp_path / "last.pth")


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.pth"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(WeightsError, match=r"cannot read checkpoint .*last\.pth: "):
        read_torch_file(path)


def test_run_folder_without_ckpt_pth_points_at_its_checkpoints(tmp_path):
    for name in ("best.pth", "last.pth"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"holds no ckpt\.pth .*; it holds best\.pth, last\.pth: pass one with "
                                           r"--checkpoint .*last\.pth"):
        checkpoint_path(None, str(tmp_path))


def test_resizing_beyond_the_decompression_bomb_limit_names_dataset_res(tiny_data, monkeypatch):
    dataset = build_dataset(DatasetConfig(data_type="directory", data_path=str(tiny_data), n_classes=3, res=256),
                            "train")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the 48 x 64 files open; 256 x 341 is too large
    with pytest.raises(DataError, match=r"resized to 256 px, .* Lower dataset\.res"):
        dataset[0]


def test_a_device_given_as_checkpoint_is_named_as_such():
    with pytest.raises(WeightsError, match=r"/dev/null is not a regular file \(a device or a pipe\)"):
        read_torch_file("/dev/null")


def test_a_checkpoint_holding_other_objects_is_refused_without_torch_s_advice(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"net_model_state_dict": Path("x")}, path)
    with pytest.raises(WeightsError) as err:
        read_torch_file(path)
    assert "holds Python objects other than tensors" in str(err.value) and "weights_only" not in str(err.value)


def test_a_full_disk_while_writing_a_report_names_the_file_and_leaves_no_empty_one(tiny_data, tmp_path, monkeypatch,
                                                                                 capsys):
    options = tiny_options(tmp_path, tiny_data)
    assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
    import engine.metrics

    def full_disk(self, path, **kwargs):
        Path(path).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.metrics.Figure, "savefig", full_disk)
    out = tmp_path / "report"
    status = run_main(eval_script.main, ["--checkpoint", str(tmp_path / "output" / "tiny" / "last.pth"), "--debug",
                                         "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and f"cannot write {out / 'confusion_matrix.png'}: No space left on device" in err
    assert sorted(p.name for p in out.iterdir()) == ["eval_report.json"]  # complete; no empty picture
