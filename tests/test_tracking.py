"""wandb without credentials, without network, under Ctrl-C, and which mode wins."""
import os
import signal
import time
from pathlib import Path

import pytest

import run
from tests.conftest import tiny_options
from tests.test_signals import Job, alive, children, wait_for
from utils.cli import run_main
from config import WandbConfig
from utils.errors import ConfigError
from engine.tracking import wandb_mode

pytestmark = pytest.mark.usefixtures("shallow_vit")

FAKE_KEY = "0123456789abcdef" * 3  # 48 characters: well-formed, unknown to any server


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """A home without ~/.netrc and wandb settings, and no key in the environment."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return home


@pytest.mark.parametrize("debug, command_line, env, expected", [
    (True, True, "online", "disabled"),  # --debug disables whatever else says
    (False, True, "offline", "online"),  # wandb.mode on the command line beats WANDB_MODE
    (False, False, "offline", "offline"),  # WANDB_MODE beats the option file
    (False, False, "dryrun", "offline"),  # wandb's older name
    (False, False, None, "online"),  # the option file
])
def test_mode_precedence(monkeypatch, debug, command_line, env, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert wandb_mode(WandbConfig(mode="online"), disabled=debug, from_command_line=command_line) == expected


def test_unknown_wandb_mode_in_the_environment_is_named(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match=r"WANDB_MODE='sometimes' in the environment: expected one of online"):
        wandb_mode(WandbConfig(), disabled=False, from_command_line=False)


def test_online_without_credentials_stops_before_any_work_with_one_line(tiny_data, tmp_path, no_credentials, capsys):
    options = tiny_options(tmp_path, tiny_data, wandb={"name": "tiny", "mode": "online"})
    assert run_main(run.main, ["--opt", str(options)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wandb has no credentials: log in with `wandb login`" in err
    assert "--debug" in err and "wandb.mode=offline" in err
    assert not (tmp_path / "output").exists()


def test_online_without_network_logs_offline_after_the_timeout(tiny_data, tmp_path, no_credentials, monkeypatch,
                                                               caplog):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # credentials, but this machine reaches no wandb server
    options = tiny_options(tmp_path, tiny_data, wandb={"name": "tiny", "mode": "online", "init_timeout": 3})
    start = time.monotonic()
    assert run_main(run.main, ["--opt", str(options)]) == 0
    assert time.monotonic() - start < 60
    assert "this run logs offline" in caplog.text and "wandb sync" in caplog.text
    assert list((tmp_path / "output" / "tiny" / "wandb").glob("offline-run-*/*.wandb"))


def test_ctrl_c_while_wandb_waits_for_its_server_is_honoured_at_once(tiny_data, tmp_path, no_credentials):
    options = tiny_options(tmp_path, tiny_data, wandb={"name": "tiny", "mode": "online", "init_timeout": 600})
    env = {name: os.environ.get(name) for name in ("HOME", "NETRC", "WANDB_CONFIG_DIR", "WANDB_MODE", "WANDB_SILENT")}
    job = Job("run.py", "--opt", str(options), folder=tmp_path / "console", env={**env, "WANDB_API_KEY": FAKE_KEY})
    job.wait_for(lambda: wandb_services(job.pid), "wandb's service, which then waits for its server")
    services = wandb_services(job.pid)
    sent = time.monotonic()
    os.kill(job.pid, signal.SIGINT)  # Ctrl-C
    ended = job.end()
    assert time.monotonic() - sent < 60  # not after wandb.init_timeout (600 s)
    assert ended.status == 130 and ended.err.strip().splitlines()[-1] == "interrupted", ended.err
    wait_for(lambda: not any(alive(pid) for pid in services), "wandb's service to end")


def wandb_services(pid: int) -> list[int]:
    """The wandb-core processes that process ``pid`` started."""
    found = []
    for child in children(pid):
        try:
            if b"wandb-core" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found
