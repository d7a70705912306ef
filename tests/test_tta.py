"""Flip test-time augmentation (eval.tta "flip") and the cluster matching that eval_report.json stores."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_script
from engine.evaluate import segment_code
from model import build_model
from tests.conftest import TINY_COLORS, random_checkpoint, tiny_options
from utils.cli import run_main
from config import load_config

pytestmark = pytest.mark.usefixtures("shallow_vit")


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """A checkpoint of a random tiny model that carries its options."""
    folder = tmp_path_factory.mktemp("tta")
    options = tiny_options(folder, tiny_data, eval={"is_crf": True, "crf_workers": 0})
    return random_checkpoint(options, folder / "last.pth"), load_config(options)


def test_with_flip_tta_the_prediction_of_a_mirrored_image_is_the_mirrored_prediction(checkpoint):
    _, cfg = checkpoint
    torch.manual_seed(1)
    net, linear, cluster = (m.eval() for m in build_model(cfg.model, 3))
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        code, mirrored = segment_code(net, img, tta=True), segment_code(net, img.flip(-1), tta=True)
        assert torch.equal(mirrored, code.flip(-1))  # the same two terms, added in the other order
        assert not torch.equal(segment_code(net, img.flip(-1)), segment_code(net, img).flip(-1))  # without TTA
        up = F.interpolate(code, (320, 480), mode="bilinear", align_corners=False)
        up_mirrored = F.interpolate(mirrored, (320, 480), mode="bilinear", align_corners=False)
        assert torch.allclose(up_mirrored, up.flip(-1), atol=1e-5)  # the upsampling mirrors up to float rounding
        for scores, scores_of_mirrored in ((linear(up), linear(up_mirrored)),
                                           (cluster(up).inner, cluster(up_mirrored).inner)):
            differ = scores_of_mirrored.argmax(1) != scores.argmax(1).flip(-1)
            top2 = scores_of_mirrored.topk(2, dim=1).values
            assert bool((top2[:, 0] - top2[:, 1])[differ].le(1e-5).all())  # only float ties may go either way
            assert int(differ.sum()) <= 1e-4 * differ.numel()


def square_validation_set(data, root, mirrored: bool):
    """The tiny training set with 64 x 64 validation images: evaluation resizes them to 320 by an integer factor,
    which commutes with mirroring (the protocol's nearest-neighbour resize by other factors does not)."""
    rng = np.random.default_rng(3)
    for kind in ("imgs", "labels"):
        shutil.copytree(data / kind / "train", root / kind / "train")
        (root / kind / "val").mkdir(parents=True)
    for i in range(4):
        label = np.zeros((64, 64), np.uint8)
        label[:, rng.integers(8, 56):] = 1
        top, left = rng.integers(0, 40, size=2)
        label[top:top + 24, left:left + 24] = 2
        image = (TINY_COLORS[label] + rng.normal(0, 12, (64, 64, 3))).clip(0, 255).astype(np.uint8)
        if mirrored:
            image, label = image[:, ::-1].copy(), label[:, ::-1].copy()
        Image.fromarray(image).save(root / "imgs" / "val" / f"{i:03d}.png")
        Image.fromarray(label).save(root / "labels" / "val" / f"{i:03d}.png")
    return root


def evaluate(checkpoint, out, *overrides):
    assert run_main(eval_script.main, ["--checkpoint", str(checkpoint), "--out", str(out), "--debug", *overrides]) == 0
    return json.loads((out / "eval_report.json").read_text())


def test_flip_tta_scores_a_mirrored_validation_set_as_the_original(checkpoint, tiny_data, tmp_path):
    path, _ = checkpoint
    data = square_validation_set(tiny_data, tmp_path / "data", mirrored=False)
    mirrored = square_validation_set(tiny_data, tmp_path / "mirrored", mirrored=True)
    original = evaluate(path, tmp_path / "a", "eval.tta=flip", f"dataset.data_path={data}")
    flipped = evaluate(path, tmp_path / "b", "eval.tta=flip", f"dataset.data_path={mirrored}")
    plain = evaluate(path, tmp_path / "c", f"dataset.data_path={data}")
    assert original["tta"] == "flip" and plain["tta"] == "none"
    for metric, value in original["no_crf"].items():  # the dense CRF's lattice is not mirror-symmetric
        assert flipped["no_crf"][metric] == pytest.approx(value, abs=1e-9), metric
    assert original["no_crf"] != plain["no_crf"]  # TTA changes the predictions of this model


def test_the_report_holds_the_cluster_matching_before_and_after_crf(checkpoint, tmp_path):
    path, _ = checkpoint
    report = evaluate(path, tmp_path)
    matching = report["matching"]
    assert matching["classes"] == ["red", "green", "blue"]
    for setting in ("no_crf", "crf"):
        assert sorted(matching[setting]) == [0, 1, 2]  # one cluster per class, no extra clusters here
    assert set(report) >= {"no_crf", "crf", "per_class_iou", "per_class_iou_crf", "checkpoint", "n_images"}
