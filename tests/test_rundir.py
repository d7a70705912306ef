"""A run owns its directory: concurrent runs, refused resumes, leftovers of killed runs, permissions, the filesystem."""
import errno
import json
import logging
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest
import torch

import engine.rundir
import eval as eval_script
import run
import utils.files
from tests.conftest import patch_ppap_loss, tiny_options
from tests.test_signals import WAIT_S
from tests.world import as_a_program, fork
from utils.cli import run_main
from utils.files import FolderLock

pytestmark = pytest.mark.usefixtures("shallow_vit")


def train(options: Path, *args: str) -> int:
    return run_main(run.main, ["--opt", str(options), "--debug", *args])


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_second_run_into_a_busy_run_directory_is_refused_from_its_first_moment(tiny_data, tmp_path, capsys):
    options = tiny_options(tmp_path, tiny_data)
    run_dir = tmp_path / "output" / "tiny"
    first = FolderLock(run_dir / engine.rundir.LOCK_FILE)
    assert first.acquire()  # a run that has started but written no checkpoint yet
    try:
        assert train(options) == 2
    finally:
        first.release()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run_dir} is in use by process {os.getpid()} on " in err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing of the second run was written


def lock_and_die(run_dir: Path) -> None:
    FolderLock(run_dir / engine.rundir.LOCK_FILE).acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_refused_first_run_leaves_no_folder_behind(tiny_data, tmp_path, capsys):
    options = tiny_options(tmp_path, tiny_data, dataset={"data_path": str(tmp_path / "missing")})
    assert train(options) == 2  # refused once it owns its folder: the data is not there
    assert "missing not found" in capsys.readouterr().err
    assert not (tmp_path / "output").exists()


def test_a_run_lists_the_files_it_wrote_not_its_lock(finished_run):
    listed = finished_run.out.split("wrote into")[1].splitlines()
    assert any(line.endswith("last.pth") for line in listed) and any(line.endswith("config.json") for line in listed)
    assert not any(line.endswith(engine.rundir.LOCK_FILE) for line in listed)


def test_run_directory_of_a_killed_run_is_not_left_locked(tmp_path):
    run_dir = tmp_path / "output" / "tiny"
    holder = fork(lock_and_die, run_dir)
    holder.join()
    assert holder.exitcode == -signal.SIGKILL
    assert (run_dir / ".lock").read_text().split()[0] == str(holder.pid)  # the killed holder's
    engine.rundir.own_folder(run_dir).release()  # what a run does first: it may have the folder


def test_refused_resume_leaves_the_run_directory_untouched(finished_run, tmp_path):
    options = finished_run.copy(tmp_path)
    run_dir = tmp_path / "output" / "tiny"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert train(options, "--resume", "training_coeff.tau=0.5") == 2
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_resume_trims_the_log_to_the_checkpoint_iteration(tiny_data, tmp_path, monkeypatch):
    options = tiny_options(tmp_path, tiny_data, train={"epoch": 2})
    patch_ppap_loss(monkeypatch, interrupt_at=4)  # Ctrl-C in iteration 4: last.pth holds iteration 2
    assert train(options) == 130
    log = tmp_path / "output" / "tiny" / "log.jsonl"
    assert [r["iter"] for r in strict_json_lines(log) if r["type"] == "train"] == [1, 2, 3]
    with log.open("a") as f:
        f.write('{"type": "train", "iter": 3, "lo')  # a line cut short by a kill
    monkeypatch.undo()
    assert train(options, "--resume") == 0
    records = strict_json_lines(log)
    assert [r["iter"] for r in records if r["type"] == "train"] == list(range(1, 9))
    assert [r["iter"] for r in records if r["type"] == "val"] == [2, 4, 6, 8]


def test_temporaries_of_a_killed_checkpoint_write_are_removed_when_the_run_resumes(finished_run, tmp_path):
    options = finished_run.copy(tmp_path)
    run_dir = tmp_path / "output" / "tiny"
    leftover = run_dir / ".last.pth.0badf00d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    kept = run_dir / "notes.tmp"  # not one of ours
    kept.write_text("mine")
    assert train(options, "--resume", "train.epoch=2") == 0
    assert not leftover.exists() and kept.exists()


def test_checkpoints_are_readable_as_widely_as_the_other_outputs(finished_run):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in finished_run.folder.iterdir() if p.is_file()}
    assert modes["last.pth"] == modes["best.pth"] == modes["config.json"] == 0o644


def test_output_dir_under_a_file_is_one_line_naming_it_and_status_2(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    options = tiny_options(tmp_path, tiny_data, output_dir=str(blocker / "output"))
    assert train(options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker / "output") in err and "Not a directory" in err


@pytest.mark.parametrize("failure", ["oserror", "torch_runtime_error"])
def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(finished_run, tmp_path, monkeypatch,
                                                                              capsys, failure):
    options = finished_run.copy(tmp_path, train={"epoch": 2})
    run_dir = tmp_path / "output" / "tiny"
    before = (run_dir / "last.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f):
        real_save({"part": torch.zeros(10)}, f)  # some bytes reach the disk, then it is full
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(utils.files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    assert train(options, "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {run_dir}" in err and "No space left on device" in err
    assert (run_dir / "last.pth").read_bytes() == before
    assert not list(run_dir.glob(".*.tmp"))


def test_eval_out_naming_or_under_a_file_is_one_line(finished_run, tmp_path, capsys):
    out = tmp_path / "report_file"
    out.write_text("")
    checkpoint = str(finished_run.folder / "last.pth")
    assert run_main(eval_script.main, ["--checkpoint", checkpoint, "--debug", "--out", str(out)]) == 2
    assert run_main(eval_script.main, ["--checkpoint", checkpoint, "--debug", "--out", str(out / "sub")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and f"--out {out} is a file" in err[0] and f"{out / 'sub'}: Not a directory" in err[1]


def test_a_new_run_starts_a_new_log(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data)
    log = tmp_path / "output" / "tiny" / "log.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text('{"type": "train", "iter": 1, "loss": 7.0}\n')  # from a run killed before its first checkpoint
    assert train(options) == 0
    assert [r["iter"] for r in strict_json_lines(log) if r["type"] == "train"] == [1, 2, 3, 4]
    assert all(r.get("loss") != 7.0 for r in strict_json_lines(log))


def test_log_lines_are_strict_json_even_when_a_value_is_not_finite(tiny_data, tmp_path):
    options = tiny_options(tmp_path, tiny_data, train={"num_accum": 2})  # no step, so no gradient norm, every other line
    assert train(options) == 0
    records = strict_json_lines(tmp_path / "output" / "tiny" / "log.jsonl")
    assert [r["grad_norm"] is None for r in records if r["type"] == "train"] == [True, False, True, False]


def generate_demo_data(root: Path, log: Path) -> None:
    """A program's first run on the demo set, its stderr (where the generation is announced) into ``log``."""
    from dataset.demo import ensure_demo_data

    as_a_program(None, log)
    logging.basicConfig(level=logging.INFO, force=True)
    ensure_demo_data(root, splits={"train": 6, "val": 2})


def test_two_first_runs_generate_the_demo_data_once(tmp_path):
    processes = [fork(generate_demo_data, tmp_path / "demo", tmp_path / f"{i}.err") for i in range(2)]
    for p in processes:
        p.join(timeout=WAIT_S)
    assert [p.exitcode for p in processes] == [0, 0]
    logs = [(tmp_path / f"{i}.err").read_text() for i in range(2)]
    assert sum("generated the demo set" in log for log in logs) == 1, logs
    assert len(list((tmp_path / "demo" / "imgs" / "train").iterdir())) == 6


def test_partial_demo_data_of_a_killed_generation_is_removed(tmp_path):
    from dataset.demo import ensure_demo_data

    stale = tmp_path / ".demo.partial-99999"
    (stale / "imgs").mkdir(parents=True)
    ensure_demo_data(tmp_path / "demo", splits={"train": 2, "val": 1})
    assert not stale.exists() and (tmp_path / "demo" / "demo_info.json").is_file()
