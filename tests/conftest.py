"""Shared fixtures of the end-to-end tests: a tiny labelled image folder, the shipped demo options shrunk to it, and
ViTs of two blocks where the depth does not matter."""
import contextlib
import functools
import io
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import model.ppap
from model.vit import vit

ROOT = Path(__file__).resolve().parents[1]
SHALLOW_DEPTH = 2  # blocks of the ViTs the end-to-end tests build: the second-to-last and the last one
DEMO_OPTIONS = ROOT / "json" / "demo.json"
TINY_COLORS = np.array([(200, 60, 40), (50, 180, 60), (60, 80, 200)], np.float32)  # one per class


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of the tests that take one (cpu or cuda); benchmarks/gpu_check.py passes cuda")


def pytest_collection_modifyitems(items):
    for item in items:  # python -m pytest -m device selects the tests that take a device
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker("device")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device given with --device (default cpu)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A 3-class ``directory`` set (16 train, 4 val images of 48 x 64 px): coloured halves and a square."""
    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 4)):
        (root / "imgs" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((48, 64), np.uint8)
            label[:, rng.integers(16, 48):] = 1
            top, left = rng.integers(0, 24), rng.integers(0, 40)
            label[top:top + 20, left:left + 20] = 2
            label[0, 0] = 255  # one unlabelled pixel
            image = TINY_COLORS[label.clip(0, 2)] + rng.normal(0, 12, (48, 64, 3))
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "imgs" / split / f"{i:03d}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i:03d}.png")
    return root


def tiny_options(folder: Path, data_path: Path, **sections) -> Path:
    """An option file extending the shipped json/demo.json, shrunk to CPU-test size; ``sections`` update it."""
    options = {
        "base": str(DEMO_OPTIONS),
        "output_dir": str(folder / "output"),
        "device": "cpu",
        "wandb": {"name": "tiny", "mode": "disabled"},
        "dataset": {"data_type": "directory", "data_path": str(data_path), "n_classes": 3,
                    "class_names": ["red", "green", "blue"], "res": 64},
        "dataloader": {"batch_size": 4, "num_workers": 0},
        "training_coeff": {"initialcrit_pos": 0.5, "initialcrit_amb": 0.1},
        "train": {"print_freq": 1, "valid_freq": 2, "epoch": 1},
        "eval": {"is_crf": False, "is_visualize": False, "n_images": 2, "crf_workers": 0, "res": 64},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            options.setdefault(section, {}).update(values)
        else:
            options[section] = values
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "options.json"
    path.write_text(json.dumps(options))
    return path


@dataclass(frozen=True)
class FinishedRun:
    """A finished tiny run: its run folder (which tests only read), the data it trained on, and what it printed."""

    folder: Path
    data: Path
    out: str

    def copy(self, tmp_path: Path, **sections) -> Path:
        """The run's folder copied to ``tmp_path/output/tiny``, for a test that changes it (resumes it, breaks it);
        returns the option file of the copy (``tiny_options`` of ``tmp_path``, ``sections`` updating it)."""
        shutil.copytree(self.folder, tmp_path / "output" / "tiny")
        return tiny_options(tmp_path, self.data, **sections)


@pytest.fixture(scope="session")
def finished_run(tiny_data, tmp_path_factory) -> FinishedRun:
    """``run.py`` with ``tiny_options`` as they are (1 epoch of 4 iterations, validation every 2, shallow ViTs),
    written under umask 022: the run most tests need, trained once per test session."""
    import run
    from utils.cli import run_main

    folder = tmp_path_factory.mktemp("finished")
    options, out = tiny_options(folder, tiny_data), io.StringIO()
    previous = os.umask(0o022)
    try:
        with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
            patch.setattr(model.ppap, "vit", functools.partial(vit, depth=SHALLOW_DEPTH))
            assert run_main(run.main, ["--opt", str(options), "--debug"]) == 0
    finally:
        os.umask(previous)
    return FinishedRun(folder / "output" / "tiny", tiny_data, out.getvalue())


@pytest.fixture(scope="module")
def shallow_vit():
    """Every PPAP network built while the fixture is active has a ViT of two blocks (released DINO ViTs have 12);
    a module of end-to-end tests uses it with ``pytestmark = pytest.mark.usefixtures("shallow_vit")``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.ppap, "vit", functools.partial(vit, depth=SHALLOW_DEPTH))
        yield


@pytest.fixture
def ctrl_c_raises():
    """Ctrl-C raises KeyboardInterrupt in this process, as in a program started from a terminal, even when the tests
    run as a shell's background job (whose SIGINT the shell ignores)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


OVERFLOW = 1e30  # finite in fp32, so the run goes on; its gradients overflow fp16 (max 65504)


def patch_ppap_loss(monkeypatch, overflow_at=(), interrupt_at=None) -> None:
    """Count the PPAP loss calls of the training iterations (one each; the validation's label-free criterion calls it
    in inference mode, uncounted): raise KeyboardInterrupt (Ctrl-C) at call ``interrupt_at``, multiply the loss by
    ``OVERFLOW`` at the calls in ``overflow_at``."""
    from loss import PPAPLoss

    original, calls = PPAPLoss.forward, {"n": 0}

    def patched(self, *args, **kwargs):
        if torch.is_inference_mode_enabled():
            return original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        result = original(self, *args, **kwargs)
        return result._replace(loss=result.loss * OVERFLOW) if calls["n"] in overflow_at else result

    monkeypatch.setattr(PPAPLoss, "forward", patched)


def random_checkpoint(options: Path, path: Path, n_classes: int = 3, seed: int = 0) -> Path:
    """A checkpoint of a randomly initialised model that carries the options of ``options`` (what eval.py needs)."""
    from config import config_to_dict, load_config

    cfg = load_config(options)
    torch.manual_seed(seed)
    net, linear, cluster = model.ppap.build_model(cfg.model, n_classes)
    torch.save({"epoch": 0, "iter": 0, "best_epoch": 0, "best_iter": 0, "best": 0.0,
                "net_model_state_dict": net.state_dict(), "linear_model_state_dict": linear.state_dict(),
                "cluster_model_state_dict": cluster.state_dict(), "net_optimizer_state_dict": None,
                "linear_optimizer_state_dict": None, "cluster_optimizer_state_dict": None,
                "config": config_to_dict(cfg)}, path)
    return path


def weights_differ(a: dict, b: dict) -> list[str]:
    """The keys of two state dicts whose weights differ by more than float noise of other batch shapes (1e-3 of their
    norm): what runs on different numbers of processes may differ in. In ``decoder.attn.qkv.bias`` the key part is
    left out: its true gradient is 0 (softmax ignores a constant shift), so Adam amplifies float noise there."""
    differ = []
    for key, value in a.items():
        other = b[key]
        if key.endswith("decoder.attn.qkv.bias"):
            dim = value.shape[0] // 3
            value, other = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([other[:dim], other[2 * dim:]])
        if float((value - other).norm()) > 1e-3 * float(value.norm()) + 1e-7:
            differ.append(key)
    return differ
