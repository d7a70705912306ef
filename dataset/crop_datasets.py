"""Write the five-crop training set of an option file's dataset (cocostuff27 or cityscapes).

    python dataset/crop_datasets.py --opt json/your_options.json [dataset.data_path=/data/cocostuff ...]

Resumable: rerun after an interruption to finish; a complete set is skipped. Exit status 2 on user errors.
"""
import sys
from pathlib import Path

if not __package__:  # run as `python dataset/<script>.py`: import from the repo root, not from dataset/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from dataset.crop import CROPS_PER_IMAGE, write_five_crops  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import ExitStatus  # noqa: E402
from config import load_config  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write the five-crop training set of a dataset.")
    parser.add_argument("--opt", required=True, help="option file (JSON)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="worker processes, 0 = in this process (default: dataloader.num_workers)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dataset.data_path=/data/cocostuff")
    args = parser.parse_args(argv)
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0 (got {args.num_workers})")
    cfg = load_config(args.opt, args.overrides)
    workers = cfg.dataloader.num_workers if args.num_workers is None else args.num_workers
    for report in write_five_crops(cfg.dataset, workers):
        print(f"{report.split}: {report.images} images -> {report.images * CROPS_PER_IMAGE} crops "
              f"in {report.folder} ({report.written} cropped now)")
    return ExitStatus.OK


if __name__ == "__main__":
    sys.exit(run_main(main))
