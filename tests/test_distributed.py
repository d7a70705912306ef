"""Data-parallel processes (gloo on the CPU, spawned as torchrun would start them) compute what one process computes."""
import pytest
import torch

from dataclasses import replace
from pathlib import Path

from dataset import EpochSampler, SeededSamples, build_dataset, make_loader
from loss import PPAPLoss
from tests.test_loss import clustered, unit_z
from tests.conftest import tiny_options
from tests.world import run_in_world
from utils.config import TrainingCoeff, load_config
from utils.distributed import ONE_PROCESS


def loss_part(world, z, feats, coeff, anchors, feats_dtype):
    """This process's rows of the global batch (its images, in rank order) -> its loss part and z's gradient."""
    rows = world.share(z.shape[0])
    mine = z[rows.start:rows.stop].detach().clone().requires_grad_()
    result = PPAPLoss(coeff, feats_dtype=feats_dtype)(mine, feats[rows.start:rows.stop], anchors, world=world)
    result.loss.backward()
    return result.loss.item(), mine.grad, result.num_pos.item(), result.num_neg.item()


@pytest.mark.parametrize("split, processes, feats_dtype, launcher", [
    (16, 2, None, "torchrun"),  # 4 blocks, 2 per process
    (16, 3, None, "torchrun"),  # 4 blocks over 3 processes: shares of 1 and 2
    (48, 2, None, "torchrun"),  # 1 block: process 0 computes none
    (16, 2, torch.float16, "torchrun"),  # train.gather_feats fp16: rounded alike with one process
    (16, 2, None, "srun")])  # the processes of a SLURM job step
def test_the_loss_split_over_processes_equals_the_loss_of_one_process(split, processes, feats_dtype, launcher):
    n = 48 * processes  # 48 rows (three 4 x 4 images) per process
    coeff = TrainingCoeff(split=split, trainpatchsplit=4, initialcrit_pos=0.5, initialcrit_amb=0.1)
    loss_fn = PPAPLoss(coeff, feats_dtype=feats_dtype)
    feats, z = clustered(n, 6, 4, 0.4, seed=1), unit_z(n, 5, seed=2)
    anchors = loss_fn.draw_anchors(n, torch.Generator().manual_seed(3))
    expected = loss_fn(z, feats, anchors, world=ONE_PROCESS)
    expected.loss.backward()

    parts = run_in_world(loss_part, processes, z.detach(), feats, coeff, anchors, feats_dtype, launcher=launcher)
    loss = sum(part[0] for part in parts)
    grad = torch.cat([part[1] for part in parts])
    assert loss == pytest.approx(expected.loss.item(), rel=1e-10)
    assert torch.allclose(grad, z.grad, rtol=1e-10, atol=1e-14)
    assert float(z.grad.abs().sum()) > 0
    for part in parts:  # the statistics are those of the global batch on every process
        assert part[2] == pytest.approx(expected.num_pos.item(), rel=1e-12)
        assert part[3] == pytest.approx(expected.num_neg.item(), rel=1e-12)


def test_rounding_the_features_changes_what_is_mined_a_little():
    coeff = TrainingCoeff(split=96, trainpatchsplit=4, initialcrit_pos=0.5, initialcrit_amb=0.1)
    feats, z = clustered(96, 6, 4, 0.4, seed=1), unit_z(96, 5, seed=2)
    anchors = PPAPLoss(coeff).draw_anchors(96, torch.Generator().manual_seed(3))
    exact = PPAPLoss(coeff)(z, feats, anchors)
    halved = PPAPLoss(coeff, feats_dtype=torch.float16)(z, feats, anchors)
    assert halved.loss.item() != exact.loss.item()
    assert halved.loss.item() == pytest.approx(exact.loss.item(), rel=1e-2)
    assert halved.loss.item() == PPAPLoss(coeff)(z, feats.half().double(), anchors).loss.item()


@pytest.mark.parametrize("processes", [2, 4])
@pytest.mark.parametrize("start_batch", [0, 2])
def test_the_parts_of_the_processes_make_the_global_batches_of_one_process(processes, start_batch):
    one = EpochSampler(40, 8, seed=5)
    one.set_epoch(3, start_batch)
    parts = []
    for rank in range(processes):
        sampler = EpochSampler(40, 8, seed=5, rank=rank, world_size=processes)
        sampler.set_epoch(3, start_batch)
        assert len(sampler) == len(one) // processes and sampler.local_batch_size == 8 // processes
        parts.append(list(sampler))
    per_batch = 8 // processes
    together = [item for b in range(len(one) // 8) for part in parts for item in part[b * per_batch:(b + 1) * per_batch]]
    assert together == list(one)
    assert len({index for index, _ in together}) == len(together)  # every image once per epoch


def test_random_crops_depend_on_the_image_position_not_on_the_loader_workers(tiny_data, tmp_path):
    cfg = load_config(tiny_options(tmp_path, tiny_data,
                                   dataset={"loader_crop_type": "random", "res": 32}))
    train_set = build_dataset(cfg.dataset, "train")
    batches = []
    for workers, processes in ((0, 1), (2, 1), (0, 2)):
        for rank in range(processes):
            sampler = EpochSampler(len(train_set), 4, seed=0, rank=rank, world_size=processes)
            loader = make_loader(SeededSamples(train_set), replace(cfg.dataloader, num_workers=workers), 0,
                                 torch.device("cpu"), batch_size=sampler.local_batch_size, sampler=sampler)
            before = torch.get_rng_state()
            batches.append((workers, processes, rank, [b["img"] for b in loader]))
            assert torch.equal(torch.get_rng_state(), before)  # the main process's stream is left alone
    reference = torch.cat(batches[0][3])
    for workers, processes, rank, imgs in batches[1:]:
        if processes == 1:
            assert torch.equal(torch.cat(imgs), reference)
    two = [torch.cat([a, b]) for a, b in zip(batches[2][3], batches[3][3])]  # rank 0 and 1 of each global batch
    assert torch.equal(torch.cat(two), reference)
    assert not torch.equal(reference[0], reference[1])


# ---- whole programs under torchrun: 2 processes on the CPU (gloo) against 1 ----

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from engine.checkpoint import load_checkpoint  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.test_signals import WAIT_S, alive, children, wait_for  # noqa: E402

RUN_S = 300  # bound of one tiny program run; they take seconds


def program(*args: str, processes: int = 1, **kwargs) -> subprocess.CompletedProcess:
    """``python run.py ...`` or ``torchrun --standalone --nproc_per_node=N run.py ...``."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=RUN_S, **kwargs)


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.fixture(scope="module")
def five_val_images(tiny_data, tmp_path_factory) -> Path:
    """The tiny set with a fifth validation image: 2 processes evaluate shares of 2 and 3 images."""
    root = tmp_path_factory.mktemp("five") / "data"
    shutil.copytree(tiny_data, root)
    for kind in ("imgs", "labels"):
        shutil.copy(root / kind / "val" / "000.png", root / kind / "val" / "100.png")
    return root


@pytest.fixture(scope="module")
def runs(five_val_images, tmp_path_factory):
    """One process for 2 epochs; 2 processes for the first epoch, then 1 process resuming it for the second."""
    folder = tmp_path_factory.mktemp("runs")
    one = tiny_options(folder / "one", five_val_images, train={"epoch": 2})
    two = tiny_options(folder / "two", five_val_images, train={"epoch": 1})
    for options, processes in ((one, 1), (two, 2)):
        done = program("run.py", "--opt", str(options), "--debug", processes=processes)
        assert done.returncode == 0, done.stderr
    resumed = program("run.py", "--opt", str(two), "--debug", "--resume", "train.epoch=2")
    assert resumed.returncode == 0, resumed.stderr
    return folder / "one" / "output" / "tiny", folder / "two" / "output" / "tiny", done


def test_two_processes_train_as_one_with_feature_dropout(runs):
    one, two, two_processes = runs
    assert "data-parallel training on 2 processes (cpu): global batch 4 = 2 x 2 images" in two_processes.stdout
    assert two_processes.stdout.count("[VAL]") == 2 and two_processes.stdout.count("iter      1 |") == 1  # process 0
    single, split = train_lines(one), train_lines(two)
    assert [r["iter"] for r in split] == [r["iter"] for r in single] == list(range(1, 9))
    assert split[0].keys() == single[0].keys()
    for a, b in zip(single, split):  # the losses of the global batch, iteration by iteration
        for key in ("loss", "ppap", "linear", "cluster", "num_pos", "num_neg", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5 if a["iter"] == 1 else 1e-4), (a["iter"], key)


def test_a_two_process_checkpoint_resumes_on_one_process_to_the_same_weights(runs):
    one, two, _ = runs
    a, b = load_checkpoint(one / "last.pth"), load_checkpoint(two / "last.pth")
    assert a.keys() == b.keys()
    for part in ("net_model_state_dict", "linear_model_state_dict", "cluster_model_state_dict"):
        assert a[part].keys() == b[part].keys()  # the released names, no "module." prefix
        for key, value in a[part].items():
            other = b[part][key]
            if key == "decoder.attn.qkv.bias":  # the key part's true gradient is 0: Adam amplifies float noise
                dim = value.shape[0] // 3
                value, other = torch.cat([value[:dim], value[2 * dim:]]), torch.cat([other[:dim], other[2 * dim:]])
            assert float((value - other).norm()) <= 1e-3 * float(value.norm()) + 1e-7, (part, key)


def test_two_processes_evaluate_every_image_once_as_one_does(runs, tmp_path):
    one, _, _ = runs
    reports = []
    for processes in (1, 2):
        out = tmp_path / str(processes)
        done = program("eval.py", "--checkpoint", str(one / "last.pth"), "--out", str(out), "eval.is_crf=true",
                       "eval.crf_workers=1", processes=processes)
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("images of directory val") == 1
        report = json.loads((out / "eval_report.json").read_text())
        assert report.pop("seconds")["total"] > 0  # how long it took: the one key that may differ
        reports.append(report)
    assert reports[0]["n_images"] == 5
    assert reports[0] == reports[1]  # metrics and per-class IoU before and after CRF, exactly


@pytest.mark.parametrize("override, message", [
    ("dataset.data_path=/nonexistent/data", "error: /nonexistent/data not found"),
    ("dataloader.batch_size=3", "error: dataloader.batch_size (3) is the global batch and must be a multiple"),
])
def test_a_user_error_under_torchrun_ends_every_process_with_status_2_and_one_message(tiny_data, tmp_path,
                                                                                        override, message):
    options = tiny_options(tmp_path, tiny_data)
    done = program("run.py", "--opt", str(options), "--debug", override, processes=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr
    assert len(re.findall(r"exitcode\s*: 2 ", done.stderr)) == 2, done.stderr  # torchrun: both processes ended with 2
    assert done.returncode != 0
    assert not (tmp_path / "output" / "tiny" / "config.json").exists()


def test_killing_one_of_two_processes_ends_the_other(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 1000})
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "run.py", "--opt", str(options), "--debug"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for((tmp_path / "output" / "tiny" / "last.pth").exists, "the first checkpoint")
        workers = children(launcher.pid)
        rank = {int(re.search(rb"(?:^|\0)RANK=(\d+)", Path(f"/proc/{pid}/environ").read_bytes()).group(1)): pid
                for pid in workers}
        os.kill(rank[1], signal.SIGKILL)
        launcher.communicate(timeout=WAIT_S)
        assert launcher.returncode != 0
        wait_for(lambda: not alive(rank[0]), "process 0 to end", timeout=10)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
