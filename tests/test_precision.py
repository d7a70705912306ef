"""Mixed precision on the CPU: fp16 (with its loss scaler) and bf16 training and evaluation, resume, overflow."""
import copy
import json
from pathlib import Path

import pytest
import torch

import engine.train
import run
from engine.checkpoint import load_checkpoint
from tests.conftest import patch_ppap_loss, tiny_options
from utils.cli import run_main
from utils.device import GRAD_SCALER_INIT_SCALE

pytestmark = pytest.mark.usefixtures("shallow_vit")

NETWORK, PROBES = "net_model_state_dict", ("linear_model_state_dict", "cluster_model_state_dict")


def train(options: Path, *args: str) -> int:
    return run_main(run.main, ["--opt", str(options), "--debug", *args])


def records(folder: Path, kind: str) -> list[dict]:
    lines = (folder / "output" / "tiny" / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory, device):
    """The same tiny run in fp32, fp16 and bf16; fp16 with its final evaluation after CRF too."""
    folders = {}
    for precision in ("fp32", "fp16", "bf16"):
        folders[precision] = tmp_path_factory.mktemp(precision)
        options = tiny_options(folders[precision], tiny_data, precision=precision, device=str(device),
                               eval={"is_crf": precision == "fp16", "crf_workers": 0})
        assert train(options) == 0
    return folders


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_and_evaluates_on_the_cpu(runs, precision):
    final = json.loads((runs[precision] / "output" / "tiny" / "final_metrics.json").read_text())
    assert all(0 <= v <= 100 for which in final.values() for setting in which.values() for v in setting.values())
    assert set(final["last"]) == ({"no_crf", "crf"} if precision == "fp16" else {"no_crf"})
    assert load_checkpoint(runs[precision] / "output" / "tiny" / "last.pth")["config"]["precision"] == precision


@pytest.mark.parametrize("precision, tolerance", [("fp16", 1e-2), ("bf16", 5e-2)])
def test_mixed_precision_losses_are_close_to_fp32_but_not_equal(runs, precision, tolerance):
    reference, mixed = records(runs["fp32"], "train")[0], records(runs[precision], "train")[0]
    for term in ("ppap", "linear", "cluster"):
        assert mixed[term] == pytest.approx(reference[term], rel=tolerance, abs=tolerance)
    assert mixed["ppap"] != reference["ppap"] or mixed["linear"] != reference["linear"]  # autocast took effect


def test_fp16_checkpoint_holds_the_scaler_state(runs):
    state = load_checkpoint(runs["fp16"] / "output" / "tiny" / "last.pth")["scaler_state_dict"]
    assert state["scale"] == GRAD_SCALER_INIT_SCALE and state["_growth_tracker"] == 4  # four finite steps
    assert load_checkpoint(runs["bf16"] / "output" / "tiny" / "last.pth")["scaler_state_dict"] == {}


def test_fp16_overflow_skips_the_network_step_and_halves_the_scale(tiny_data, tmp_path, monkeypatch, device):
    saved = {}
    save = engine.train.save_atomically

    def keep(ckpt, path):  # a copy of every last.pth, by iteration
        if path.name == "last.pth":
            saved[ckpt["iter"]] = copy.deepcopy(ckpt)
        save(ckpt, path)

    monkeypatch.setattr(engine.train, "save_atomically", keep)
    patch_ppap_loss(monkeypatch, overflow_at={2})
    options = tiny_options(tmp_path, tiny_data, precision="fp16", device=str(device), train={"valid_freq": 1})
    assert train(options) == 0
    assert [saved[i]["scaler_state_dict"]["scale"] for i in (1, 2, 3)] == [2048, 1024, 1024]
    assert same(saved[1][NETWORK], saved[2][NETWORK])  # the overflowing step was skipped for the network
    assert not same(saved[2][NETWORK], saved[3][NETWORK])  # and the next one was taken
    assert all(not same(saved[1][part], saved[2][part]) for part in PROBES)  # their gradients were finite
    assert records(tmp_path, "train")[1]["grad_norm"] is None  # not finite, so null in the JSON line


def test_fp16_resume_restores_the_scaler_state_exactly(tiny_data, tmp_path, monkeypatch):
    """On the CPU, where every kernel is deterministic (on CUDA, index_add_ and others are not)."""
    whole = tiny_options(tmp_path / "whole", tiny_data, precision="fp16", train={"epoch": 2})
    patch_ppap_loss(monkeypatch, overflow_at={1})  # the scale is 1024 from the first iteration on
    assert train(whole) == 0
    broken = tiny_options(tmp_path / "broken", tiny_data, precision="fp16", train={"epoch": 2})
    monkeypatch.undo()
    patch_ppap_loss(monkeypatch, overflow_at={1}, interrupt_at=4)  # Ctrl-C in iteration 4: last.pth holds iteration 2
    assert train(broken) == 130
    assert train(broken, "--resume") == 0
    a = load_checkpoint(tmp_path / "whole" / "output" / "tiny" / "last.pth")
    b = load_checkpoint(tmp_path / "broken" / "output" / "tiny" / "last.pth")
    assert a["iter"] == b["iter"] == 8
    assert a["scaler_state_dict"] == b["scaler_state_dict"] and a["scaler_state_dict"]["scale"] == 1024
    assert all(same(a[key], b[key]) for key in (NETWORK, *PROBES))
