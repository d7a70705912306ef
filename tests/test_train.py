import json
import os
from pathlib import Path

import pytest
import torch

import run
from dataset import EpochSampler
from engine.checkpoint import RELEASED_KEYS, load_checkpoint
from engine.train import Progress
from loss.probe import bilinear_weights, probe_cross_entropy, upsample
from loss import PPAPLoss
from tests.conftest import ROOT, patch_ppap_loss, tiny_options
from utils.cli import run_main
from config import load_config
from utils.device import deterministic_algorithms
from utils.files import save_atomically

pytestmark = pytest.mark.usefixtures("shallow_vit")

RELEASED = set(RELEASED_KEYS) | {"net_optimizer_state_dict", "linear_optimizer_state_dict",
                                 "cluster_optimizer_state_dict", "epoch", "iter", "best_epoch", "best_iter", "best"}
METRICS = {"Cluster_mIoU", "Cluster_Accuracy", "Linear_mIoU", "Linear_Accuracy"}


def train(options: Path, *args: str) -> int:
    return run_main(run.main, ["--opt", str(options), "--debug", *args])


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One finished tiny run (1 epoch of 4 iterations, validation every 2), with CRF in the final evaluation."""
    folder = tmp_path_factory.mktemp("trained")
    options = tiny_options(folder, tiny_data, eval={"is_crf": True, "is_visualize": True, "crf_workers": 2})
    assert train(options) == 0
    return folder / "output" / "tiny"


def test_run_writes_checkpoints_with_the_released_keys(trained):
    blocks = {k.split(".")[2] for k in load_checkpoint(trained / "last.pth")["net_model_state_dict"]
              if k.startswith("model.blocks.")}
    assert blocks == {"0", "1"}  # the shallow test ViT
    for name in ("best.pth", "last.pth", "label_free.pth"):
        ckpt = load_checkpoint(trained / name)
        assert RELEASED <= set(ckpt)
        assert {k.split(".")[0] for k in ckpt["net_model_state_dict"]} == {"model", "decoder", "project_head"}
    assert load_checkpoint(trained / "last.pth")["iter"] == 4


def test_run_directory_holds_config_log_and_final_report(trained):
    assert load_config(trained / "config.json").dataset.n_classes == 3
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("train") == 4 and [r["type"] for r in records].count("val") == 2
    for record in (r for r in records if r["type"] == "val"):  # the label-free criteria and choice of each validation
        assert {"cluster_similarity", "rankme", "ppap_loss", "stability", "label_free"} <= set(record)
    final = json.loads((trained / "final_metrics.json").read_text())
    assert set(final) == {"best", "last", "label_free"}
    assert all(set(final[w]) == {"no_crf", "crf"} and set(final[w]["crf"]) == METRICS for w in final)
    assert (trained / "last_visualization.png").stat().st_size > 0
    assert (trained / "curves.png").stat().st_size > 0  # drawn from log.jsonl at the end of training


def test_curves_are_redrawn_at_a_validation_only_once_their_interval_has_passed(tmp_path, monkeypatch):
    import engine.journal

    drawn, clock = [], {"now": 1000.0}
    monkeypatch.setattr(engine.journal, "save_curves", lambda records, path: drawn.append(clock["now"]))
    monkeypatch.setattr(engine.journal.time, "monotonic", lambda: clock["now"])
    journal = engine.journal.Journal(tmp_path / "log.jsonl", tracker=None)
    for step in (1.0, engine.journal.CURVES_EVERY_S - 2.0, 1.5, 0.0):  # validations after these many seconds
        clock["now"] += step
        journal.draw_curves(tmp_path / "curves.png")
    journal.draw_curves(tmp_path / "curves.png", now=True)  # the end of training
    journal.close()
    start = 1000.0
    assert drawn == [start + engine.journal.CURVES_EVERY_S + 0.5, start + engine.journal.CURVES_EVERY_S + 0.5]


def test_checkpoint_rebuilds_the_model_from_its_config_alone(trained):
    ckpt = load_checkpoint(trained / "last.pth")
    cfg = load_config(trained / "config.json")
    from engine.checkpoint import networks_from_checkpoint

    net, _, _ = networks_from_checkpoint(ckpt, cfg.model, 3, "last.pth")
    assert states_equal(net.state_dict(), ckpt["net_model_state_dict"])


def test_train_line_reports_losses_anchor_statistics_and_speed(trained):
    record = json.loads((trained / "log.jsonl").read_text().splitlines()[0])
    assert {"loss", "ppap", "linear", "cluster", "num_pos", "num_neg", "lr", "grad_norm", "images_per_s"} <= set(record)
    assert record["loss"] == pytest.approx(record["ppap"] + record["linear"] + record["cluster"], rel=1e-5)


@pytest.fixture(scope="module")
def two_epochs(tiny_data, tmp_path_factory) -> Path:
    """The run folder of a tiny run of two epochs (8 iterations) without interruption."""
    folder = tmp_path_factory.mktemp("whole")
    assert train(tiny_options(folder, tiny_data, train={"epoch": 2})) == 0
    return folder / "output" / "tiny"


def test_resume_continues_exactly_where_an_interrupted_run_stopped(two_epochs, tiny_data, tmp_path, monkeypatch):
    broken = tiny_options(tmp_path / "broken", tiny_data, train={"epoch": 2})
    patch_ppap_loss(monkeypatch, interrupt_at=4)  # Ctrl-C in iteration 4: last.pth holds iteration 2
    assert train(broken) == 130
    assert load_checkpoint(tmp_path / "broken" / "output" / "tiny" / "last.pth")["iter"] == 2
    monkeypatch.undo()
    assert train(broken, "--resume") == 0
    for name in ("last.pth", "best.pth"):
        a = load_checkpoint(two_epochs / name)
        b = load_checkpoint(tmp_path / "broken" / "output" / "tiny" / name)
        assert a["iter"] == b["iter"]
        for key in RELEASED_KEYS:
            assert states_equal(a[key], b[key]), (name, key)


def test_training_n_then_resuming_to_2n_equals_training_2n(two_epochs, finished_run, tmp_path):
    half = finished_run.copy(tmp_path)  # one epoch
    assert train(half, "--resume", "train.epoch=2") == 0
    a = load_checkpoint(two_epochs / "last.pth")
    b = load_checkpoint(tmp_path / "output" / "tiny" / "last.pth")
    assert a["iter"] == b["iter"] == 8
    assert all(states_equal(a[key], b[key]) for key in RELEASED_KEYS)
    assert a["net_optimizer_state_dict"]["state"].keys() == b["net_optimizer_state_dict"]["state"].keys()


def test_same_seed_gives_the_same_numbers(finished_run, tiny_data, tmp_path):
    assert train(tiny_options(tmp_path, tiny_data)) == 0  # finished_run's options
    logs = [(folder / "log.jsonl").read_text().splitlines() for folder in (finished_run.folder,
                                                                          tmp_path / "output" / "tiny")]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "images_per_s"}  # noqa: E731
    assert [strip(x) for x in logs[0]] == [strip(x) for x in logs[1]]


@pytest.mark.parametrize("size, out", [((28, 28), (224, 224)), ((5, 7), (40, 33)), ((40, 30), (7, 9)),
                                       ((1, 3), (4, 4))])
def test_the_deterministic_upsampling_is_bilinear_interpolation(size, out):
    logits = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.interpolate(logits, out, mode="bilinear", align_corners=False)
    with deterministic_algorithms(True):
        got = upsample(logits, out)
    upstream = torch.randn_like(expected)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    (want_grad,), (got_grad,) = (torch.autograd.grad(y, logits, upstream) for y in (expected, got))
    assert torch.allclose(got_grad, want_grad, rtol=0, atol=1e-12)


def test_deterministic_runs_repeat_and_leave_the_setting_as_it_was(tiny_data, tmp_path, monkeypatch):
    import loss.probe

    calls = []
    monkeypatch.setattr(loss.probe, "bilinear_weights",
                        lambda *a: calls.append(torch.are_deterministic_algorithms_enabled()) or bilinear_weights(*a))
    for name in ("a", "b"):
        assert train(tiny_options(tmp_path / name, tiny_data, deterministic=True)) == 0
    assert calls and all(calls)  # the training step ran with deterministic algorithms
    assert not torch.are_deterministic_algorithms_enabled()  # and the setting came back after the run
    a, b = (load_checkpoint(tmp_path / n / "output" / "tiny" / "last.pth") for n in ("a", "b"))
    assert all(states_equal(a[key], b[key]) for key in RELEASED_KEYS)


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    options = tiny_options(tmp_path, tiny_data)
    original = PPAPLoss.forward
    calls = {"n": 0}

    def diverging(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if torch.is_inference_mode_enabled():  # the validation's label-free criterion
            return result
        calls["n"] += 1
        return result._replace(loss=result.loss * float("nan")) if calls["n"] == 3 else result

    monkeypatch.setattr(PPAPLoss, "forward", diverging)
    assert train(options) == 1
    err = capsys.readouterr().err
    assert "iteration 3 (epoch 0, batch 2): the PPAP loss is nan; training stopped" in err
    assert "last.pth is the last good checkpoint" in err
    assert load_checkpoint(tmp_path / "output" / "tiny" / "last.pth")["iter"] == 2


def test_wandb_offline_writes_its_run_files(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = tiny_options(tmp_path, tiny_data, wandb={"name": "tiny", "mode": "offline"})
    assert run_main(run.main, ["--opt", str(options)]) == 0
    runs = list((tmp_path / "output" / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert load_checkpoint(tmp_path / "output" / "tiny" / "last.pth")["wandb_run_id"] in runs[0].name


def test_a_new_run_never_overwrites_an_existing_one(trained, capsys):
    config_before = (trained / "config.json").read_text()
    options = trained.parent.parent / "options.json"
    assert train(options) == 2
    assert "already holds a run (last.pth); pass --resume" in capsys.readouterr().err
    assert (trained / "config.json").read_text() == config_before


@pytest.mark.parametrize("args, message", [
    (["dataset.data_path=/nowhere/at/all"], "/nowhere/at/all"),
    (["train.epochz=1"], "unknown key train.epochz (did you mean train.epoch?)"),
    (["--resume", "wandb.name=fresh"], "--resume: "),
])
def test_user_errors_give_one_line_and_status_2(tiny_data, tmp_path, capsys, args, message):
    options = tiny_options(tmp_path, tiny_data)
    assert train(options, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_every_shipped_option_file_loads():
    files = sorted((ROOT / "json").rglob("*.json"))
    assert len(files) >= 14
    for path in files:
        load_config(path)


def test_kill_between_temporary_write_and_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_atomically({"iter": 1, "weights": torch.ones(3)}, path)

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies after writing the temporary file, before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"iter": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["iter"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(20, 4, seed=3), EpochSampler(20, 4, seed=3)
    a.set_epoch(2)
    b.set_epoch(2, start_batch=3)
    assert list(b) == list(a)[12:]
    a.set_epoch(1)
    assert list(a) != list(b)


def test_probe_loss_ignores_unlabelled_pixels():
    logits = torch.randn(1, 3, 2, 2)
    label = torch.tensor([[[0, -1], [2, -1]]])
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1).reshape(-1, 3)[[0, 2]], torch.tensor([0, 2]))
    assert probe_cross_entropy(logits, label, 3).item() == pytest.approx(expected.item())
    assert probe_cross_entropy(logits, torch.full((1, 2, 2), -1), 3).item() == 0.0


def test_progress_round_trips_through_its_state_dict():
    progress = Progress(epoch=3, batch_in_epoch=7, iteration=52, best=201.5, best_epoch=2, best_iter=40)
    restored = Progress()
    restored.load_state_dict(progress.state_dict())
    assert restored == progress
    assert {"epoch", "iter", "best", "best_epoch", "best_iter"} <= set(progress.state_dict())  # released names


def test_test_flag_evaluates_the_runs_checkpoints_again(trained, capsys):
    final = json.loads((trained / "final_metrics.json").read_text())
    (trained / "final_metrics.json").unlink()
    assert train(trained.parent.parent / "options.json", "--test") == 0
    assert json.loads((trained / "final_metrics.json").read_text()) == final
    assert "best.pth after CRF" in capsys.readouterr().out


def test_run_py_refuses_the_checkpoint_flag_it_would_ignore(tiny_data, tmp_path, capsys):
    assert train(tiny_options(tmp_path, tiny_data), "--checkpoint", "x.pth") == 2
    assert "run.py does not read --checkpoint" in capsys.readouterr().err


def test_resume_from_a_checkpoint_without_training_state_is_refused(trained, tmp_path, capsys):
    run_dir = tmp_path / "output" / "tiny"
    run_dir.mkdir(parents=True)
    weights_only = {k: v for k, v in load_checkpoint(trained / "last.pth").items() if k in RELEASED}
    torch.save(weights_only, run_dir / "last.pth")
    options = trained.parent.parent / "options.json"
    assert train(options, "--resume", f"output_dir={tmp_path / 'output'}") == 2
    assert "holds no training state" in capsys.readouterr().err
