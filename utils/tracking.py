"""Weights & Biases tracking: one object the loops log through, a no-op when wandb is disabled."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from utils.config import WandbConfig

log = logging.getLogger(__name__)


class Tracker:
    """``wandb.init`` with the original's settings (resume allowed, tags default to the data type), so that runs
    land in a wandb project next to the original's."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: Mapping[str, Any], default_tag: str,
                 disabled: bool = False, run_id: Optional[str] = None) -> None:
        self.mode = "disabled" if disabled else cfg.mode
        self.run = None
        if self.mode == "disabled":
            return
        import wandb  # imported only when used: it is slow to import

        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name, dir=str(run_dir),
                              resume="allow", mode=self.mode, id=run_id or cfg.id, notes=cfg.notes,
                              tags=list(cfg.tags) if cfg.tags is not None else [default_tag], config=dict(config))

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
