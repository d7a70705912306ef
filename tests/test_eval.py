import hashlib
import importlib
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from dataset import build_dataset
from engine.evaluate import evaluate
from engine.train import final_evaluation
from model import build_model
from tests.conftest import tiny_options
from utils.cli import run_main
from config import config_to_dict, load_config
from utils.distributed import launch
from engine.tracking import Tracker

pytestmark = pytest.mark.usefixtures("shallow_vit")

eval_script = importlib.import_module("eval")
METRICS = {"Cluster_mIoU", "Cluster_Accuracy", "Linear_mIoU", "Linear_Accuracy"}


def released_checkpoint(cfg, n_classes: int, seed: int = 0) -> dict:
    """A checkpoint in the layout of the released PPAP files, from a tiny random model."""
    torch.manual_seed(seed)
    net, linear, cluster = build_model(cfg.model, n_classes)
    return {"epoch": 4, "iter": 1000, "best_epoch": 4, "best_iter": 1000, "best": 150.0,
            "net_model_state_dict": net.state_dict(), "net_optimizer_state_dict": None,
            "linear_model_state_dict": linear.state_dict(), "linear_optimizer_state_dict": None,
            "cluster_model_state_dict": cluster.state_dict(), "cluster_optimizer_state_dict": None}


@pytest.fixture(scope="module")
def released(tiny_data, tmp_path_factory):
    """An option file naming checkpoint "ppap_tiny" and {output_dir}/ppap_tiny/ckpt.pth in the released layout."""
    folder = tmp_path_factory.mktemp("released")
    options = tiny_options(folder, tiny_data, checkpoint="ppap_tiny",
                           eval={"is_crf": True, "is_visualize": True, "n_images": 2, "crf_workers": 0})
    cfg = load_config(options)
    path = folder / "output" / "ppap_tiny" / "ckpt.pth"
    path.parent.mkdir(parents=True)
    torch.save(released_checkpoint(cfg, 3), path)
    return options, path


@pytest.fixture(scope="module")
def report(released):
    options, path = released
    assert run_main(eval_script.main, ["--opt", str(options), "--debug"]) == 0
    return json.loads((path.parent / "ckpt_eval_report.json").read_text())


def test_released_checkpoint_is_evaluated_before_and_after_crf(report):
    assert set(report["no_crf"]) == METRICS and set(report["crf"]) == METRICS
    assert all(0 <= v <= 100 for setting in ("no_crf", "crf") for v in report[setting].values())
    assert report["n_images"] == 4 and report["checkpoint"].endswith("ppap_tiny/ckpt.pth")


def test_the_torch_crf_backend_gives_the_same_metrics_and_says_so(report, released, tmp_path):
    options, _ = released
    assert run_main(eval_script.main, ["--opt", str(options), "--debug", "--out", str(tmp_path),
                                       "eval.crf_backend=torch"]) == 0
    torch_report = json.loads((tmp_path / "eval_report.json").read_text())
    assert (report["crf_backend"], torch_report["crf_backend"]) == ("pydensecrf", "torch")
    assert torch_report["no_crf"] == report["no_crf"]
    for metric in METRICS:  # the same refinement: the bound is 0.3 points on real data
        assert abs(torch_report["crf"][metric] - report["crf"][metric]) < 0.3, metric
    for timed in (report, torch_report):  # how long the evaluation and its CRF took
        assert 0 < timed["seconds"]["crf"] < timed["seconds"]["total"]


def test_report_has_per_class_iou_by_class_name(report):
    assert set(report["per_class_iou"]) == {"cluster", "linear"}
    assert set(report["per_class_iou"]["cluster"]) == {"red", "green", "blue"}


def test_confusion_matrix_and_visualisation_are_valid_pngs(report, released):
    folder = released[1].parent
    for name in ("confusion_matrix.png", "per_class_iou.png", "visualization.png"):
        with Image.open(folder / f"ckpt_{name}") as img:
            assert img.format == "PNG" and min(img.size) > 100


def test_out_folder_receives_the_report(released, tmp_path):
    options, _ = released
    assert run_main(eval_script.main, ["--opt", str(options), "--debug", "--out", str(tmp_path / "r"),
                                       "eval.is_crf=false", "eval.is_visualize=false"]) == 0
    written = json.loads((tmp_path / "r" / "eval_report.json").read_text())
    assert "crf" not in written and set(written["no_crf"]) == METRICS


def test_checkpoint_flag_takes_a_file(released, tmp_path, capsys):
    options, path = released
    assert run_main(eval_script.main, ["--opt", str(options), "--test", "--checkpoint", str(path),
                                       "--out", str(tmp_path), "eval.is_crf=false"]) == 0
    assert "before CRF" in capsys.readouterr().out


def test_mismatched_option_file_is_refused_naming_the_difference(released, capsys):
    options, _ = released
    status = run_main(eval_script.main, ["--opt", str(options), "--debug", "model.extra_clusters=2",
                                         "eval.extra_clusters=2"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert "the checkpoint has 3 cluster centroids of width 192; the options ask for 5 (3 classes + 2 " \
           "extra_clusters) of width 192 (vit_tiny)" in err


def test_other_backbone_is_refused(released, capsys):
    options, _ = released
    status = run_main(eval_script.main, ["--opt", str(options), "--debug", "model.pretrained.model_type=vit_small",
                                         "model.dim=384"])
    assert status == 2
    assert "holds a DINO vit_tiny/16 backbone; the options ask for a DINO vit_small/16" in capsys.readouterr().err


def test_missing_checkpoint_is_named(released, capsys):
    options, _ = released
    assert run_main(eval_script.main, ["--opt", str(options), "--debug", "checkpoint=absent"]) == 2
    assert "absent" in capsys.readouterr().err


def test_unlabelled_validation_set_is_refused(tiny_data, tmp_path, released, capsys):
    data = tmp_path / "unlabelled"
    (data / "imgs").mkdir(parents=True)
    for split in ("train", "val"):
        (data / "imgs" / split).symlink_to(tiny_data / "imgs" / split, target_is_directory=True)
    options, path = released
    status = run_main(eval_script.main, ["--opt", str(options), "--debug", "--checkpoint", str(path),
                                         f"dataset.data_path={data}"])
    assert status == 2 and "label" in capsys.readouterr().err


def test_predictions_are_the_argmax_of_probes_on_the_upsampled_code(released, device):
    options, path = released
    cfg = load_config(options)
    val = build_dataset(cfg.dataset, "val")
    net, linear, cluster = build_model(cfg.model, 3)
    torch.manual_seed(1)
    loader = DataLoader(val, batch_size=3)
    ev = evaluate(*(m.to(device) for m in (net, linear, cluster)), loader, device, "fp32", cfg.eval, 3)
    net, linear = net.cpu(), linear.cpu()
    confusion = np.zeros((3, 3), np.int64)  # linear prediction x true class, computed directly
    net.eval()
    with torch.no_grad():
        for item in val:
            code = F.interpolate(net(item["img"][None]).code, (320, 320), mode="bilinear", align_corners=False)
            pred = linear(code).argmax(1)[0]
            valid = item["label"] >= 0
            np.add.at(confusion, (pred[valid].numpy(), item["label"][valid].numpy()), 1)
    # on a GPU, kernels round differently: a few of the 409,600 pixels may flip, 0.01 points is 41 pixels
    assert ev.no_crf.values["Linear_Accuracy"] == pytest.approx(100 * np.trace(confusion) / confusion.sum(), abs=0.01)


@pytest.fixture(scope="module")
def ours(released, tmp_path_factory):
    """A checkpoint that carries its options (as run.py writes them) beside the released one's weights."""
    options, released_path = released
    cfg = load_config(options)
    path = tmp_path_factory.mktemp("ours") / "last.pth"
    torch.save({**torch.load(released_path, weights_only=True), "config": config_to_dict(cfg)}, path)
    return path


def test_checkpoint_with_its_options_needs_no_option_file(ours, report):
    assert run_main(eval_script.main, ["--checkpoint", str(ours), "--debug"]) == 0
    written = json.loads((ours.parent / "last_eval_report.json").read_text())
    assert written["n_images"] == 4
    assert written["no_crf"] == report["no_crf"] and written["crf"] == report["crf"]


def test_overrides_apply_to_the_options_stored_in_a_checkpoint(ours, tmp_path):
    assert run_main(eval_script.main, ["--checkpoint", str(ours), "--debug", "--out", str(tmp_path),
                                       "eval.is_crf=false"]) == 0
    assert "crf" not in json.loads((tmp_path / "eval_report.json").read_text())


def test_data_path_flag_applies_to_the_options_stored_in_a_checkpoint(ours, capsys):
    assert run_main(eval_script.main, ["--checkpoint", str(ours), "--debug", "--data_path", "/nowhere/else"]) == 2
    assert "/nowhere/else" in capsys.readouterr().err


def test_released_checkpoint_without_option_file_asks_for_one(released, capsys):
    _, path = released
    assert run_main(eval_script.main, ["--checkpoint", str(path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no options" in err and "--opt" in err


def test_option_file_that_differs_from_the_stored_options_is_named(ours, released, tmp_path, caplog):
    options, _ = released
    assert run_main(eval_script.main, ["--opt", str(options), "--checkpoint", str(ours), "--debug", "--out",
                                       str(tmp_path), "eval.is_crf=false", "dataset.res=32"]) == 0
    assert f"differ from those stored in {ours} in dataset.res, eval.is_crf;" in caplog.text


def test_no_checkpoint_and_no_option_file_is_one_clear_error(capsys):
    assert run_main(eval_script.main, ["--debug"]) == 2
    assert "pass --checkpoint FILE" in capsys.readouterr().err


def test_the_report_records_the_checkpoints_resolved_path_and_sha256(report, released):
    _, path = released
    assert report["checkpoint"] == str(path.resolve())
    assert report["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_reports_of_two_checkpoints_of_one_folder_are_kept_apart(ours, tmp_path):
    for name in ("best.pth", "last.pth"):
        shutil.copyfile(ours, tmp_path / name)
        assert run_main(eval_script.main, ["--checkpoint", str(tmp_path / name), "--debug", "eval.is_crf=false"]) == 0
    for stem in ("best", "last"):
        written = json.loads((tmp_path / f"{stem}_eval_report.json").read_text())
        assert written["checkpoint"] == str((tmp_path / f"{stem}.pth").resolve()), stem


def test_the_final_evaluation_of_a_run_records_each_checkpoints_path_and_sha256(ours, released, tmp_path):
    cfg = load_config(released[0], ["eval.is_crf=false", "eval.is_visualize=false"])
    for name in ("best.pth", "last.pth"):
        shutil.copyfile(ours, tmp_path / name)
    tracker = Tracker(cfg.wandb, tmp_path, {}, default_tag="tiny", mode="disabled")
    final_evaluation(cfg, tmp_path, launch("cpu", []), "fp32", tracker)
    sha256 = hashlib.sha256(ours.read_bytes()).hexdigest()
    for stem in ("best", "last"):
        written = json.loads((tmp_path / f"{stem}_eval_report.json").read_text())
        assert (written["checkpoint"], written["checkpoint_sha256"]) == (str((tmp_path / f"{stem}.pth").resolve()),
                                                                          sha256), stem
