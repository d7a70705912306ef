"""predict.py: every common image format and mode, any size, palette PNGs that read back as ids, the cluster matching,
flip TTA's mirror property, CRF, and one bad file among good ones."""
import json

import numpy as np
import pytest
from PIL import Image

import predict as predict_script
from dataset import color_map
from engine.predict import label_set, network_size
from tests.conftest import random_checkpoint, tiny_options
from utils.cli import run_main
from utils.config import load_config

pytestmark = pytest.mark.usefixtures("shallow_vit")


@pytest.fixture(scope="module")
def model(tiny_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    options = tiny_options(folder, tiny_data, eval={"crf_workers": 0})
    return random_checkpoint(options, folder / "last.pth"), load_config(options)


@pytest.fixture(scope="module")
def photo(tiny_data):
    return Image.open(tiny_data / "imgs" / "val" / "000.png").convert("RGB")


def predict(checkpoint, out, *args):
    return run_main(predict_script.main, ["--checkpoint", str(checkpoint), "--out", str(out), *args])


def test_every_format_mode_and_size_gives_a_palette_map_of_its_size(model, photo, tmp_path, capsys):
    checkpoint, cfg = model
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    photo.save(inputs / "rgb.jpg")
    photo.resize((301, 157)).save(inputs / "odd.webp")
    photo.convert("L").save(inputs / "grey.tif")
    photo.convert("P").save(inputs / "sub" / "palette.bmp")
    photo.convert("RGBA").save(inputs / "alpha.png")
    Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)).save(inputs / "deep.png")  # 16-bit grey
    photo.resize((17, 700)).save(inputs / "tall.png")
    assert predict(checkpoint, tmp_path / "out", "--probe", "linear", str(inputs)) == 0
    assert "7 images written" in capsys.readouterr().out
    palette = np.array(Image.open(tmp_path / "out" / "rgb.png").getpalette()[:9], np.uint8).reshape(3, 3)
    assert np.array_equal(palette, color_map(cfg.dataset))  # the dataset's colours: the map looks right anywhere
    for name, source in [("rgb", "rgb.jpg"), ("odd", "odd.webp"), ("grey", "grey.tif"), ("sub/palette", "sub/palette.bmp"),
                         ("alpha", "alpha.png"), ("deep", "deep.png"), ("tall", "tall.png")]:
        written = Image.open(tmp_path / "out" / f"{name}.png")
        assert written.mode == "P" and written.size == Image.open(inputs / source).size, name
        assert np.asarray(written).max() < 3
        assert Image.open(tmp_path / "out" / f"{name}_overlay.jpg").size == written.size


def test_the_network_sees_the_shorter_side_at_320_and_multiples_of_the_patch():
    assert network_size(360, 480, 16) == (320, 432)
    assert network_size(157, 301, 14) == (322, 616)
    assert network_size(700, 17, 16) == (2048, 48)  # the longer side is capped, the shorter follows


def test_clusters_take_the_class_ids_of_the_matching(model, photo, tmp_path):
    checkpoint, _ = model
    photo.save(tmp_path / "x.png")
    assert predict(checkpoint, tmp_path / "raw", str(tmp_path / "x.png")) == 0  # no report: cluster ids
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"matching": {"classes": ["red", "green", "blue"], "no_crf": [2, 0, 1]}}))
    assert predict(checkpoint, tmp_path / "named", "--matching", str(report), str(tmp_path / "x.png")) == 0
    raw = np.asarray(Image.open(tmp_path / "raw" / "x.png"))
    named = np.asarray(Image.open(tmp_path / "named" / "x.png"))
    assert np.array_equal(named, np.array([2, 0, 1])[raw])


def test_clusters_without_a_matching_are_named_and_coloured_apart():
    labels = label_set("cluster", ["a", "b"], np.zeros((2, 3), np.uint8), 3, None)
    assert labels.names == ["cluster 0", "cluster 1", "cluster 2"] and len(np.unique(labels.colors, axis=0)) == 3
    extra = label_set("cluster", ["a", "b"], np.array([[1, 1, 1], [2, 2, 2]], np.uint8), 3, [1, -1, 0])
    assert extra.names == ["a", "b", "cluster 1"] and list(extra.to_id) == [1, 2, 0]


def test_with_flip_tta_a_mirrored_photo_gets_the_mirrored_map(model, photo, tmp_path):
    checkpoint, _ = model
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "a.png")
    photo.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "in" / "b.png")
    assert predict(checkpoint, tmp_path / "out", "--tta", "flip", "--probe", "linear", str(tmp_path / "in")) == 0
    a = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    b = np.asarray(Image.open(tmp_path / "out" / "b.png"))
    assert np.mean(a[:, ::-1] != b) < 1e-3  # equal up to float ties at class boundaries


def test_one_bad_file_is_named_and_the_others_are_written(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo.save(inputs / "good.jpg")
    photo.save(inputs / "good.png")  # the same name with another extension: both kept
    (inputs / "broken.jpg").write_bytes((inputs / "good.jpg").read_bytes()[:400])
    assert predict(checkpoint, tmp_path / "out", "--crf", str(inputs)) == 1
    out = capsys.readouterr().out
    assert "2 images written, 1 failed:" in out and "broken.jpg" in out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "good.jpg.png", "good.jpg_overlay.jpg", "good.png.png", "good.png_overlay.jpg"}


def test_both_crf_backends_paint_the_same_map(model, photo, tmp_path):
    checkpoint, _ = model
    photo.save(tmp_path / "photo.png")
    for backend in ("pydensecrf", "torch"):
        assert predict(checkpoint, tmp_path / backend, "--crf", str(tmp_path / "photo.png"),
                       f"eval.crf_backend={backend}") == 0
    maps = [np.asarray(Image.open(tmp_path / backend / "photo.png")) for backend in ("pydensecrf", "torch")]
    assert maps[0].shape == photo.size[::-1] and np.mean(maps[0] == maps[1]) >= 0.999


@pytest.mark.parametrize("given", ["empty", "missing", "pattern"])
def test_no_input_is_a_usage_error(model, tmp_path, given):
    checkpoint, _ = model
    (tmp_path / "empty").mkdir()
    argument = {"empty": str(tmp_path / "empty"), "missing": str(tmp_path / "nothing.jpg"),
                "pattern": str(tmp_path / "*.jpg")}[given]
    assert predict(checkpoint, tmp_path / "out", argument) == 2


def test_batching_images_of_one_size_changes_no_map(model, photo, tmp_path):
    checkpoint, _ = model
    (tmp_path / "in").mkdir()
    for i in range(5):
        photo.rotate(7 * i).save(tmp_path / "in" / f"{i}.png")
    photo.resize((80, 40)).save(tmp_path / "in" / "5.png")  # another size between them ends a batch
    assert predict(checkpoint, tmp_path / "one", "--batch-size", "1", str(tmp_path / "in")) == 0
    assert predict(checkpoint, tmp_path / "four", "--batch-size", "4", str(tmp_path / "in")) == 0
    for i in range(6):
        one = np.asarray(Image.open(tmp_path / "one" / f"{i}.png"))
        four = np.asarray(Image.open(tmp_path / "four" / f"{i}.png"))
        assert np.mean(one != four) < 1e-3  # equal up to float ties
