"""Evaluate a PPAP checkpoint (one of ours, or a released one) on the validation split, before and after CRF.

    python eval.py --opt json/server/cocostuff8_eval.json [--checkpoint FILE] [--out DIR] [--debug] [key=value ...]

Loads {output_dir}/{checkpoint}/ckpt.pth as the original eval.py, or the file given with --checkpoint; writes
eval_report.json, the confusion matrix (and, with eval.is_visualize, a visualisation) next to the checkpoint or
into --out. Exit status 2 for a mistake in the options, the data or the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.evaluate import checkpoint_path, evaluate_checkpoint
from utils.cli import base_parser, config_from_args, run_main
from utils.config import config_to_dict
from utils.errors import WeightsError
from utils.tracking import Tracker


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = base_parser("Evaluate a PPAP checkpoint with Hungarian matching, before and after dense CRF.")
    parser.add_argument("--out", default=None, help="folder for the report (default: the checkpoint's folder)")
    args = parser.parse_intermixed_args(argv)  # dotted overrides may come before or after the flags
    cfg = config_from_args(args)
    path = checkpoint_path(cfg, args.checkpoint)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} not found")
    out_dir = Path(args.out) if args.out else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(cfg.wandb, out_dir, config_to_dict(cfg), default_tag=cfg.dataset.data_type,
                      disabled=args.debug or args.test)
    try:
        paths = evaluate_checkpoint(cfg, path, out_dir, tracker)
    finally:
        tracker.finish()
    for name, written in paths.items():
        print(f"{name}: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
