"""Data-parallel processes (gloo on the CPU, started with the variables torchrun or srun gives them) compute what
one process computes."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import eval as eval_script
import run
from dataset import EpochSampler, SeededSamples, build_dataset, make_loader
from engine.checkpoint import load_checkpoint
from loss import PPAPLoss
from tests.conftest import ROOT, SHALLOW_DEPTH, tiny_options, weights_differ
from tests.test_loss import clustered, unit_z
from tests.test_signals import WAIT_S, alive, children, wait_for
from tests.world import finish_program, run_in_world, run_program, start_program
from utils.cli import run_main
from config import TrainingCoeff, load_config
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


# ---- whole programs: 2 processes on the CPU (gloo) against 1 ----


def train_lines(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def report_without_time(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report.pop("seconds")["total"] > 0  # how long it took: the one key that may differ
    return report


@pytest.fixture(scope="module")
def five_val_images(tiny_data, tmp_path_factory) -> Path:
    """The tiny set with a fifth validation image: 2 processes evaluate shares of 2 and 3 images."""
    root = tmp_path_factory.mktemp("five") / "data"
    shutil.copytree(tiny_data, root)
    for kind in ("imgs", "labels"):
        shutil.copy(root / kind / "val" / "000.png", root / kind / "val" / "100.png")
    return root


@pytest.fixture(scope="module")
def runs(shallow_vit, five_val_images, tmp_path_factory):
    """One process for 2 epochs; 2 processes for the first epoch (their final evaluation after CRF), its last.pth
    evaluated again by one process, then 1 process resuming the run for the second epoch."""
    folder = tmp_path_factory.mktemp("runs")
    one = tiny_options(folder / "one", five_val_images, train={"epoch": 2})
    two = tiny_options(folder / "two", five_val_images, train={"epoch": 1}, eval={"is_crf": True, "crf_workers": 1})
    assert run_main(run.main, ["--opt", str(one), "--debug"]) == 0
    ended = run_program("run.py", ["--opt", str(two), "--debug"], folder / "console", size=2, depth=SHALLOW_DEPTH)
    assert [e.status for e in ended] == [0, 0], ended[0].err + ended[1].err
    two_dir = folder / "two" / "output" / "tiny"
    assert run_main(eval_script.main, ["--checkpoint", str(two_dir / "last.pth"), "--out", str(folder / "alone"),
                                       "--debug"]) == 0
    reports = [report_without_time(path) for path in (two_dir / "last_eval_report.json",
                                                      folder / "alone" / "eval_report.json")]
    assert run_main(run.main, ["--opt", str(two), "--debug", "--resume", "train.epoch=2", "eval.is_crf=false"]) == 0
    return folder / "one" / "output" / "tiny", two_dir, ended, reports


def test_two_processes_train_as_one_with_feature_dropout(runs):
    one, two, (main, other), _ = runs
    assert "data-parallel training on 2 processes (cpu): global batch 4 = 2 x 2 images" in main.out
    assert main.out.count("[VAL]") == 2 and main.out.count("iter      1 |") == 1 and other.out == ""  # process 0
    single, split = train_lines(one), train_lines(two)
    assert [r["iter"] for r in split] == [r["iter"] for r in single] == list(range(1, 9))
    assert split[0].keys() == single[0].keys()
    for a, b in zip(single, split):  # the losses of the global batch, iteration by iteration
        for key in ("loss", "ppap", "linear", "cluster", "num_pos", "num_neg", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5 if a["iter"] == 1 else 1e-4), (a["iter"], key)


def test_a_two_process_checkpoint_resumes_on_one_process_to_the_same_weights(runs):
    one, two, _, _ = runs
    a, b = load_checkpoint(one / "last.pth"), load_checkpoint(two / "last.pth")
    assert a.keys() == b.keys()
    for part in ("net_model_state_dict", "linear_model_state_dict", "cluster_model_state_dict"):
        assert a[part].keys() == b[part].keys()  # the released names, no "module." prefix
        assert weights_differ(a[part], b[part]) == [], part


def same_up_to_float_ties(a, b) -> bool:
    """Reports equal but for metrics within 0.01 points: the processes run other batch shapes and thread counts than
    one process, so a prediction may flip where two classes tie to float rounding (one pixel moves a metric by
    about 0.005 points here)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_up_to_float_ties(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 0.01
    return a == b


def test_two_processes_evaluate_every_image_once_as_one_does(runs):
    _, _, (main, _), (two_processes, one_process) = runs
    assert main.out.count("5 images of directory val") == 1
    assert two_processes["n_images"] == one_process["n_images"] == 5 and two_processes["crf"]
    assert same_up_to_float_ties(two_processes, one_process)  # metrics, per-class IoU, matching, before and after CRF


@pytest.mark.parametrize("override, message", [
    ("dataset.data_path=/nonexistent/data", "error: /nonexistent/data not found"),
    ("dataloader.batch_size=3", "error: dataloader.batch_size (3) is the global batch and must be a multiple"),
])
def test_a_user_error_of_two_processes_ends_both_with_status_2_and_one_message(tiny_data, tmp_path, override,
                                                                               message):
    options = tiny_options(tmp_path, tiny_data)
    ended = run_program("run.py", ["--opt", str(options), "--debug", override], tmp_path / "console", size=2)
    errors = [line for e in ended for line in e.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), ended
    assert [e.status for e in ended] == [2, 2]
    assert "data-parallel training" not in ended[0].out  # the launch's summary comes only for a run that starts
    assert not (tmp_path / "output").exists()


def test_when_one_of_two_processes_is_killed_the_other_says_so_in_one_line(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 1000})
    processes = start_program("run.py", ["--opt", str(options), "--debug"], tmp_path / "console", size=2,
                              depth=SHALLOW_DEPTH)
    try:
        wait_for((tmp_path / "output" / "tiny" / "last.pth").exists, "the first checkpoint")
    finally:
        os.kill(processes[1].pid, signal.SIGKILL)
    main, _ = finish_program(processes, tmp_path / "console")
    assert main.status == 1 and "Traceback" not in main.err, main.err
    assert main.err.strip().splitlines()[-1].startswith(
        "error: process 0: another process of this run has ended, so this one stops too (")


# ---- the launcher itself: torchrun as a user starts it (slow: it and each process import torch) ----

def torchrun(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_torchrun_reports_a_user_error_of_each_process_as_status_2(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data)
    process = torchrun("run.py", "--opt", str(options), "--debug", "dataset.data_path=/nonexistent/data")
    _, err = process.communicate(timeout=WAIT_S)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: /nonexistent/data not found"), err
    assert len(re.findall(r"exitcode\s*: 2 ", err)) == 2, err  # torchrun: both processes ended with 2
    assert process.returncode != 0


@pytest.mark.slow
def test_under_torchrun_killing_one_of_two_processes_ends_the_other_with_one_line(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 1000})
    launcher = torchrun("run.py", "--opt", str(options), "--debug", start_new_session=True)
    try:
        wait_for((tmp_path / "output" / "tiny" / "last.pth").exists, "the first checkpoint")
        workers = children(launcher.pid)
        rank = {int(re.search(rb"(?:^|\0)RANK=(\d+)", Path(f"/proc/{pid}/environ").read_bytes()).group(1)): pid
                for pid in workers}
        os.kill(rank[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=WAIT_S)
        assert launcher.returncode != 0
        wait_for(lambda: not alive(rank[0]), "process 0 to end")
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    survivor = [line for line in err.splitlines()
                if line == "terminated (SIGTERM)" or line.startswith("error: process 0: another process")]
    assert len(survivor) == 1, err  # it says why it stops: torchrun's SIGTERM, or its peer's end if that came first
    assert re.search(r"rank\s*: 0 .*\n\s*exitcode\s*: (143|1) ", err), err
    assert err.count("Traceback") == 1 and "ChildFailedError" in err and "pair.cc" not in err, err  # torchrun's own
