"""Segment your own images with a trained PPAP model: a class map (palette PNG) and an overlay per image.

    python predict.py --checkpoint RUN/last.pth --out DIR [--crf] [--tta flip] [--probe cluster|linear]
                      [--matching REPORT.json [--force-matching]] [--save-scores] [--skip-existing] [--opt FILE]
                      INPUT... [key=value ...]

INPUT: image files, folders (searched recursively) or glob patterns; photos are turned as their EXIF orientation
says; output folders of predict.py among them are not read. A checkpoint written by run.py carries its options; a
released checkpoint needs --opt. The cluster probe's clusters are named by the Hungarian matching that eval.py
stored in {stem}_eval_report.json beside the checkpoint (or --matching), used only when it records this checkpoint's
path and SHA-256; without one they are "cluster k". The flags alone decide CRF and TTA. Exit status: 0 every image
written (or kept, or of an unsupported format, named), 1 some image could not be read (the others are written), 2 a
mistake in the options, the checkpoint or the inputs.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.cli import run_main

OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=")  # dotted.key=value; anything else is an input


def _parser(tta_modes: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Segment images with a trained PPAP model.")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file (run.py's, or a released one)")
    parser.add_argument("--out", required=True, help="folder for the outputs (marked as predict.py's: never read "
                        "as input)")
    parser.add_argument("--opt", default=None, help="the option file (needed for released checkpoints)")
    parser.add_argument("--crf", action="store_true", help="refine with the dense CRF of evaluation")
    parser.add_argument("--tta", default="none", choices=tta_modes, help="flip: average with the mirrored image")
    parser.add_argument("--probe", default="cluster", choices=("cluster", "linear"))
    parser.add_argument("--matching", default=None, help="eval report whose cluster matching names clusters "
                        "(default: {stem}_eval_report.json beside the checkpoint); it must record this checkpoint")
    parser.add_argument("--force-matching", action="store_true",
                        help="use --matching even where it records another checkpoint (another SHA-256)")
    parser.add_argument("--save-scores", action="store_true", help="also NAME_scores.npz: per-pixel probabilities")
    parser.add_argument("--skip-existing", action="store_true",
                        help="keep the outputs of an image whose outputs are all there (to continue a stopped run)")
    parser.add_argument("--batch-size", type=int, default=8, help="images of one size per network pass (default 8)")
    parser.add_argument("items", nargs="*", metavar="INPUT", help="images, folders or glob patterns; key=value")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    # torch and the engine load here, under run_main: Ctrl-C while they load (seconds) ends quietly too
    from dataset import class_names, color_map
    from engine.checkpoint import load_checkpoint, networks_from_checkpoint
    from engine.evaluate import checkpoint_path, config_for_checkpoint
    from engine.predict import (choose_report, collect_inputs, label_set, mark_output_folder, predict,
                                read_matching, unsupported_line)
    from utils.cli import config_from_args
    from config import TTA_MODES
    from utils.device import resolve_precision
    from utils.distributed import launch
    from utils.errors import ExitStatus

    parser = _parser(TTA_MODES)
    args = parser.parse_intermixed_args(argv)
    inputs_given = [a for a in args.items if not OVERRIDE.match(a)]
    args.overrides = [a for a in args.items if OVERRIDE.match(a)]
    args.data_path, args.debug, args.test = None, True, False
    if not inputs_given:
        parser.error("give at least one INPUT: an image, a folder or a glob pattern")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.force_matching and not args.matching:
        parser.error("--force-matching goes with --matching REPORT.json")
    out_dir = Path(args.out)
    inputs = collect_inputs(inputs_given, out_dir)
    if inputs.not_read:
        print(f"not read, as predict.py never reads its outputs: {', '.join(inputs.not_read)}")
    cfg = config_from_args(args) if args.opt else None
    path = checkpoint_path(cfg, args.checkpoint)
    ckpt = load_checkpoint(path)
    cfg = config_for_checkpoint(cfg, ckpt, args.overrides, path)
    names, colors = class_names(cfg.dataset), color_map(cfg.dataset)
    n_classes = len(names)
    net, linear, cluster = networks_from_checkpoint(ckpt, cfg.model, n_classes, str(path))
    n_clusters = n_classes + cfg.model.extra_clusters
    matching = None
    if args.probe == "cluster":
        chosen = choose_report(path, Path(args.matching) if args.matching else None, args.force_matching)
        if chosen.path is not None:
            matching = read_matching(chosen.report, chosen.path, args.crf, n_clusters, names)
        print(chosen.line)
    labels = label_set(args.probe, names, colors, n_clusters, matching)
    fabric = launch(cfg.device, cfg.gpu_ids)
    device = fabric.device
    net, linear, cluster = (m.to(device) for m in (net, linear, cluster))
    mark_output_folder(out_dir)
    summary = predict(net, linear, cluster, inputs.images, out_dir, labels, args.probe, device,
                      resolve_precision(cfg.precision, device), tta=args.tta == "flip", crf=args.crf,
                      crf_workers=cfg.eval.crf_workers, save_scores=args.save_scores, batch_size=args.batch_size,
                      crf_backend=cfg.eval.crf_backend, skip_existing=args.skip_existing)
    unsupported = inputs.unsupported + summary.unsupported
    if unsupported:
        print(unsupported_line(unsupported))
    print(f"{summary.line()}; outputs in {out_dir}")
    return ExitStatus.FAILED if summary.failed else ExitStatus.OK


if __name__ == "__main__":
    sys.exit(run_main(main))
