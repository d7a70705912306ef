"""Evaluate a PPAP checkpoint (one of ours, or a released one) on the validation split (or, with eval.split=test, a
'directory' set's test split), before and after CRF.

    python eval.py --checkpoint RUN/last.pth [--data_path DIR] [--out DIR] [--debug] [key=value ...]
    python eval.py --opt json/server/cocostuff8_eval.json [--checkpoint FILE] [--out DIR] [--debug] [key=value ...]
    torchrun --nproc_per_node=4 eval.py --checkpoint RUN/last.pth      # each process evaluates a share of the images

A checkpoint written by run.py carries its options, so it needs no --opt; a released checkpoint needs the option
file it was trained with. Without --checkpoint, {output_dir}/{checkpoint}/ckpt.pth of the option file is loaded,
as the original eval.py did. Writes {stem}_eval_report.json, {stem}_confusion_matrix.png ... next to the
checkpoint (best_eval_report.json for best.pth), or eval_report.json ... into --out; the report records the
checkpoint's resolved path and SHA-256. Exit status 2 for a mistake in the options, the data or the checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.cli import base_parser, config_from_args, overrides_from_args, run_main, sets_on_command_line
from config import config_to_dict
from utils.errors import ConfigError, ExitStatus


def main(argv: Optional[Sequence[str]] = None) -> int:
    # torch and the engine load here, under run_main: Ctrl-C while they load (seconds) ends quietly too
    from engine.checkpoint import load_checkpoint
    from engine.evaluate import checkpoint_path, config_for_checkpoint, evaluate_and_report
    from utils.device import resolve_precision
    from utils.distributed import World, launch
    from engine.tracking import Tracker, require_credentials, wandb_mode

    parser = base_parser("Evaluate a PPAP checkpoint with Hungarian matching, before and after dense CRF.",
                         opt_required=False)
    parser.add_argument("--out", default=None, help="folder for eval_report.json and its pictures (default: the "
                        "checkpoint's folder, as {stem}_eval_report.json ...)")
    args = parser.parse_intermixed_args(argv)  # dotted overrides may come before or after the flags
    cfg = config_from_args(args) if args.opt else None
    path = checkpoint_path(cfg, args.checkpoint)
    ckpt = load_checkpoint(path)
    cfg = config_for_checkpoint(cfg, ckpt, overrides_from_args(args), path)
    out_dir = Path(args.out) if args.out else path.parent
    fabric = launch(cfg.device, cfg.gpu_ids)  # one process, or this one's place among those torchrun started
    world = World(fabric)
    mode = wandb_mode(cfg.wandb, disabled=args.debug or args.test or not world.is_main,
                      from_command_line=sets_on_command_line(args, "wandb.mode"))

    def prepare_output() -> None:
        if out_dir.exists() and not out_dir.is_dir():
            raise ConfigError(f"--out {out_dir} is a file; give a folder for the report")
        if world.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        require_credentials(mode)

    world.agree(prepare_output)
    precision = resolve_precision(cfg.precision, fabric.device)
    tracker = Tracker(cfg.wandb, out_dir, config_to_dict(cfg), default_tag=cfg.dataset.data_type, mode=mode)
    try:
        # beside the checkpoint each report is named after it, as run.py names best's and last's, and a test split's
        # report after both, so that it never replaces the val report; a folder given with --out is the user's
        # choice, where the plain name is expected
        name = "" if args.out else path.stem if cfg.eval.split == "val" else f"{path.stem}_{cfg.eval.split}"
        reports = evaluate_and_report(cfg, {name: (path, ckpt)}, out_dir, fabric, precision, tracker)
    finally:
        tracker.finish()
    for written in reports.files:
        print(f"wrote {written}")
    return ExitStatus.OK


if __name__ == "__main__":
    sys.exit(run_main(main))
