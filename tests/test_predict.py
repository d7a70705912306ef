"""predict.py: every common image format and mode, any size, palette PNGs that read back as ids, the cluster matching
(only of the checkpoint's own report), flip TTA's mirror property, CRF, one bad file among good ones, EXIF
orientation, its own outputs never read, --skip-existing, and inputs of unsupported formats named."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

import engine.predict
import predict as predict_script
from dataset import color_map
from engine.predict import label_set, network_size
from tests.conftest import random_checkpoint, tiny_options
from utils.cli import run_main
from config import load_config

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
    report = eval_report(checkpoint, tmp_path / "report.json")
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
        "good.jpg.png", "good.jpg_overlay.jpg", "good.png.png", "good.png_overlay.jpg", engine.predict.OUTPUT_MARKER}


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


def eval_report(checkpoint, path, matching=(2, 0, 1), recorded=None):
    """A report as eval.py writes it, recording ``recorded`` (default ``checkpoint``): its resolved path, its
    SHA-256 and a cluster matching of the three tiny classes."""
    recorded = recorded or checkpoint
    path.write_text(json.dumps({"checkpoint": str(recorded.resolve()),
                                "checkpoint_sha256": hashlib.sha256(recorded.read_bytes()).hexdigest(),
                                "matching": {"classes": ["red", "green", "blue"], "no_crf": list(matching)}}))
    return path


@pytest.fixture(scope="module")
def cluster_ids(model, photo, tmp_path_factory):
    """The cluster ids the tiny model paints on the photo, unnamed."""
    checkpoint, _ = model
    folder = tmp_path_factory.mktemp("cluster_ids")
    photo.save(folder / "x.png")
    assert predict(checkpoint, folder / "out", str(folder / "x.png")) == 0
    return np.asarray(Image.open(folder / "out" / "x.png"))


@pytest.fixture(scope="module")
def other(tiny_data, tmp_path_factory):
    """A checkpoint of another model of the same options."""
    folder = tmp_path_factory.mktemp("other")
    return random_checkpoint(tiny_options(folder, tiny_data), folder / "other.pth", seed=1)


@pytest.fixture
def run_folder(model, photo, tmp_path):
    """A copy of the checkpoint as RUN/last.pth, and the photo to segment."""
    (tmp_path / "run").mkdir()
    checkpoint = tmp_path / "run" / "last.pth"
    shutil.copyfile(model[0], checkpoint)
    photo.save(tmp_path / "x.png")
    return checkpoint, tmp_path / "x.png"


def test_the_checkpoints_own_report_names_its_clusters(run_folder, cluster_ids, tmp_path):
    checkpoint, image = run_folder
    eval_report(checkpoint, checkpoint.parent / "last_eval_report.json")
    assert predict(checkpoint, tmp_path / "out", str(image)) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), np.array([2, 0, 1])[cluster_ids])


def test_a_plain_eval_report_beside_the_checkpoint_names_no_cluster(run_folder, cluster_ids, tmp_path):
    checkpoint, image = run_folder
    eval_report(checkpoint, checkpoint.parent / "eval_report.json")  # may be any checkpoint's of the folder
    assert predict(checkpoint, tmp_path / "out", str(image)) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), cluster_ids)


def test_a_report_that_records_another_checkpoint_names_no_cluster(run_folder, other, cluster_ids, tmp_path,
                                                                   capsys):
    checkpoint, image = run_folder
    eval_report(checkpoint, checkpoint.parent / "last_eval_report.json", recorded=other)
    assert predict(checkpoint, tmp_path / "out", str(image)) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), cluster_ids)
    assert '"cluster k"' in capsys.readouterr().out


def test_a_copy_of_a_checkpoint_under_another_folder_takes_no_report_along(run_folder, cluster_ids, tmp_path):
    checkpoint, image = run_folder
    eval_report(checkpoint, checkpoint.parent / "last_eval_report.json")
    (tmp_path / "copy").mkdir()
    for name in ("last.pth", "last_eval_report.json"):
        shutil.copyfile(checkpoint.parent / name, tmp_path / "copy" / name)
    assert predict(tmp_path / "copy" / "last.pth", tmp_path / "out", str(image)) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), cluster_ids)


def test_matching_of_another_checkpoint_is_refused_in_one_line(run_folder, other, tmp_path, capsys):
    checkpoint, image = run_folder
    report = eval_report(other, tmp_path / "other_eval_report.json")
    assert predict(checkpoint, tmp_path / "out", "--matching", str(report), str(image)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(report) in err and "--force-matching" in err


def test_force_matching_names_clusters_with_another_checkpoints_report(run_folder, other, cluster_ids, tmp_path):
    checkpoint, image = run_folder
    report = eval_report(other, tmp_path / "other_eval_report.json")
    assert predict(checkpoint, tmp_path / "out", "--matching", str(report), "--force-matching", str(image)) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "x.png")), np.array([2, 0, 1])[cluster_ids])


def test_a_second_run_with_out_inside_the_input_reads_none_of_its_outputs(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    (tmp_path / "photos").mkdir()
    photo.save(tmp_path / "photos" / "a.jpg")
    out = tmp_path / "photos" / "pred"
    assert predict(checkpoint, out, str(tmp_path / "photos")) == 0
    assert predict(checkpoint, out, str(tmp_path / "photos")) == 0
    assert "1 image written" in capsys.readouterr().out.splitlines()[-1]
    assert {p.name for p in out.rglob("*")} == {"a.png", "a_overlay.jpg", engine.predict.OUTPUT_MARKER}


def test_the_output_folder_inside_an_input_is_said_to_be_left_out(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    (tmp_path / "photos").mkdir()
    photo.save(tmp_path / "photos" / "a.jpg")
    assert predict(checkpoint, tmp_path / "photos" / "pred", str(tmp_path / "photos")) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "not read" in line]
    assert len(said) == 1 and str(tmp_path / "photos" / "pred") in said[0]


def test_an_earlier_output_folder_inside_an_input_is_not_read(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    (tmp_path / "photos").mkdir()
    photo.save(tmp_path / "photos" / "a.jpg")
    assert predict(checkpoint, tmp_path / "photos" / "earlier", str(tmp_path / "photos")) == 0
    assert predict(checkpoint, tmp_path / "elsewhere", str(tmp_path / "photos")) == 0
    assert "1 image written" in capsys.readouterr().out.splitlines()[-1]
    assert {p.name for p in (tmp_path / "elsewhere").iterdir()} == {"a.png", "a_overlay.jpg",
                                                                     engine.predict.OUTPUT_MARKER}


def test_an_input_inside_out_is_not_overwritten_by_its_own_map(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    photo.save(tmp_path / "a.png")
    before = (tmp_path / "a.png").read_bytes()
    assert predict(checkpoint, tmp_path, str(tmp_path / "a.png")) == 2
    assert (tmp_path / "a.png").read_bytes() == before and capsys.readouterr().err.count("\n") == 1


def sideways(photo):
    """The photo as a phone stores a portrait shot: turned a quarter, with the EXIF orientation that turns it back."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # "rotate 90 degrees clockwise to display"
    return photo.transpose(Image.Transpose.ROTATE_90), exif


def test_a_phone_photo_is_segmented_as_viewers_show_it(model, photo, tmp_path):
    checkpoint, _ = model
    stored, exif = sideways(photo)
    stored.save(tmp_path / "phone.jpg", exif=exif)
    assert predict(checkpoint, tmp_path / "out", "--probe", "linear", str(tmp_path / "phone.jpg")) == 0
    for name in ("phone.png", "phone_overlay.jpg"):
        assert Image.open(tmp_path / "out" / name).size == photo.size, name


def test_an_exif_turned_image_gets_the_map_of_its_upright_pixels(model, photo, tmp_path):
    checkpoint, _ = model
    (tmp_path / "in").mkdir()
    stored, exif = sideways(photo)
    stored.save(tmp_path / "in" / "turned.png", exif=exif)
    photo.save(tmp_path / "in" / "upright.png")
    assert predict(checkpoint, tmp_path / "out", "--probe", "linear", str(tmp_path / "in")) == 0
    turned = np.asarray(Image.open(tmp_path / "out" / "turned.png"))
    upright = np.asarray(Image.open(tmp_path / "out" / "upright.png"))
    assert turned.shape == upright.shape and np.mean(turned != upright) < 1e-3  # equal up to float ties


def test_an_image_with_unreadable_exif_data_is_segmented_as_stored(model, photo, tmp_path):
    checkpoint, _ = model
    photo.save(tmp_path / "odd.png", exif=b"Exif\x00\x00not a TIFF header")
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "odd.png")) == 0
    assert Image.open(tmp_path / "out" / "odd.png").size == photo.size


def test_skip_existing_keeps_complete_outputs_and_writes_the_missing_ones(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "a.png")
    photo.save(tmp_path / "in" / "b.png")
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "in")) == 0
    (tmp_path / "out" / "b_overlay.jpg").unlink()  # b was interrupted
    kept = {name: (tmp_path / "out" / name).stat().st_ino for name in ("a.png", "a_overlay.jpg")}
    assert predict(checkpoint, tmp_path / "out", "--skip-existing", str(tmp_path / "in")) == 0
    assert "1 image written, 1 kept" in capsys.readouterr().out
    assert (tmp_path / "out" / "b_overlay.jpg").is_file()
    assert all((tmp_path / "out" / name).stat().st_ino == kept[name] for name in kept)  # a rewrite is a new file


def test_skip_existing_with_save_scores_writes_an_image_without_its_scores(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    photo.save(tmp_path / "a.png")
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "a.png")) == 0
    assert predict(checkpoint, tmp_path / "out", "--skip-existing", "--save-scores", str(tmp_path / "a.png")) == 0
    assert (tmp_path / "out" / "a_scores.npz").is_file() and "1 image written" in capsys.readouterr().out


def test_inputs_of_an_unsupported_format_are_named_in_one_line(model, photo, tmp_path, capsys):
    checkpoint, _ = model
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "a.png")
    photo.save(tmp_path / "in" / "anim.gif", save_all=True, append_images=[photo.rotate(90)])
    photo.save(tmp_path / "in" / "pages.tif", save_all=True, append_images=[photo.rotate(90)])
    assert predict(checkpoint, tmp_path / "out", "--probe", "linear", str(tmp_path / "in")) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "unsupported format" in line]
    assert len(said) == 1 and "anim.gif" in said[0] and "pages.tif" in said[0] and "1 image written" in out


def test_a_camera_jpeg_with_extra_pictures_is_segmented_as_its_photo(model, photo, tmp_path):
    checkpoint, _ = model
    photo.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[photo.resize((32, 24))])
    assert predict(checkpoint, tmp_path / "out", str(tmp_path / "camera.jpg")) == 0  # a preview after the photo
    assert Image.open(tmp_path / "out" / "camera.png").size == photo.size


def test_many_unsupported_inputs_are_counted_and_the_first_few_named():
    line = engine.predict.unsupported_line([(Path(f"{i}.gif"), "GIF") for i in range(20)])
    assert line.count(".gif") == engine.predict.NAMED_AT_MOST and "20 inputs" in line
