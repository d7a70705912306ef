"""Weights & Biases tracking: one object the loops log through, a no-op when wandb is disabled.

Which mode a program runs wandb in (``wandb_mode``): ``--debug`` (or ``--test``) disables it; otherwise ``wandb.mode``
given on the command line, then ``WANDB_MODE`` in the environment, then the option file. Online mode needs
credentials: ``require_credentials`` checks for them before any work, without network and without a prompt (wandb
would otherwise ask on a terminal and wait). With credentials but no network, ``wandb.init`` waits at most
``wandb.init_timeout`` seconds, then the run logs offline and says how to upload it later.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from config import WANDB_MODES, WandbConfig
from utils import signals
from utils.errors import ConfigError

log = logging.getLogger(__name__)

MODE_ENV = "WANDB_MODE"
# wandb looks up the account ("viewer") at login and at init: a network round trip that the credential check must
# not make, and two 5 s retries without network. Runs log to the project and entity they name without it.
ACCOUNT_LOOKUP_ENV = "WANDB_X_DISABLE_VIEWER"
LEGACY_MODES = {"dryrun": "offline", "run": "online"}  # older WANDB_MODE values wandb still accepts


def wandb_mode(cfg: WandbConfig, disabled: bool, from_command_line: bool) -> str:
    """The mode to run wandb in: disabled (``--debug``/``--test``), else the command line's ``wandb.mode``, else
    ``WANDB_MODE``, else the option file's."""
    if disabled:
        return "disabled"
    env = os.environ.get(MODE_ENV, "").strip().lower()
    if from_command_line or not env:
        return cfg.mode
    env = LEGACY_MODES.get(env, env)
    if env not in WANDB_MODES:
        raise ConfigError(f"{MODE_ENV}={os.environ[MODE_ENV]!r} in the environment: expected one of "
                          f"{', '.join(WANDB_MODES)}")
    return env


def _import_wandb():
    os.environ.setdefault(ACCOUNT_LOOKUP_ENV, "true")
    import wandb  # imported only when used: it is slow to import

    return wandb


def require_credentials(mode: str) -> None:
    """For online mode, raise ``ConfigError`` unless wandb has an API key (WANDB_API_KEY, ~/.netrc or wandb's
    settings): checked locally, no network, no prompt."""
    if mode != "online":
        return
    wandb = _import_wandb()
    env_mode = os.environ.pop(MODE_ENV, None)  # wandb.login answers False in offline mode, whatever the key
    try:
        logged_in = wandb.login(prompt=False, verify=False)
    except wandb.errors.AuthenticationError as err:
        raise ConfigError(f"wandb: {str(err).splitlines()[0]}; fix the key (wandb login --relogin), or run with "
                          f"--debug (no wandb) or wandb.mode=offline") from None
    finally:
        if env_mode is not None:
            os.environ[MODE_ENV] = env_mode
    if not logged_in:
        raise ConfigError("wandb.mode is online but wandb has no credentials: log in with `wandb login` (or set "
                          "WANDB_API_KEY), or run with --debug (no wandb) or wandb.mode=offline")


class Tracker:
    """``wandb.init`` with the original's settings (resume allowed, tags default to the data type), so that runs
    land in a wandb project next to the original's; ``mode`` comes from ``wandb_mode``."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: Mapping[str, Any], default_tag: str, mode: str,
                 run_id: Optional[str] = None) -> None:
        self.mode = mode
        self.run = None
        if mode == "disabled":
            return
        wandb = _import_wandb()
        self._wandb = wandb
        options = dict(project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group, dir=str(run_dir),
                       resume="allow", id=run_id or cfg.id, notes=cfg.notes, config=dict(config),
                       tags=list(cfg.tags) if cfg.tags is not None else [default_tag])
        if mode == "offline":
            self.run = wandb.init(mode="offline", **options)
            return
        try:
            # Ctrl-C or SIGTERM while wandb waits for its server: end its service first, so that nothing in wandb's
            # own handling of the interrupt waits for it, then leave at once
            with signals.on_stop(_kill_wandb_service):
                self.run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=cfg.init_timeout), **options)
        except KeyboardInterrupt:
            _stop_wandb_service(wandb)
            raise
        except wandb.errors.Error as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.run = wandb.init(mode="offline", **options)
            log.warning("wandb could not start an online run within wandb.init_timeout=%g s (%s); this run logs "
                        "offline into %s. Upload it later with: wandb sync %s", cfg.init_timeout, first_line,
                        Path(self.run.dir).parent, Path(self.run.dir).parent)

    @property
    def run_id(self) -> Optional[str]:
        return self.run.id if self.run is not None else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def log_images(self, images: Mapping[str, np.ndarray | str | Path], step: int) -> None:
        """Images as HxWx3 uint8 arrays or PNG paths, one wandb.Image each."""
        if self.run is not None:
            self.run.log({name: self._wandb.Image(str(img) if isinstance(img, Path) else img)
                          for name, img in images.items()}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _stop_wandb_service(wandb) -> None:
    """End this process's wandb-core service, which would otherwise hold the program's exit until the init timeout
    runs out (it runs in a session of its own, so Ctrl-C in the terminal does not reach it), and wandb's state."""
    _kill_wandb_service()
    try:
        wandb.teardown()
    except Exception:  # the service is gone: teardown's connection fails, which is what we asked for
        pass


def _kill_wandb_service() -> None:
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == os.getpid() and b"wandb-core" in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            continue
