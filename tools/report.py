"""Seeds and sweeps in one table: the final metrics of many runs, grouped by everything but the seed, with mean +-
standard deviation and min-max per group.

    python -m tools.report RUN_DIR... [--out DIR]

A RUN_DIR is a run directory (it holds config.json and final_metrics.json, as run.py writes them) or a folder below
which run directories are searched. One table per checkpoint choice (best.pth, last.pth) and setting (before / after
CRF) is printed; ``summary.md``, ``summary.json``, ``summary.csv`` and ``summary_curves.png`` (the validation curves
of each group's runs with their mean and range) are written into ``--out`` (default: the first RUN_DIR). How runs
are grouped (by their options and the fingerprint of their data, data_fingerprint.json): engine/report.py. Unfinished
runs and runs whose files cannot be read are left out, each kind named in one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.errors import ExitStatus


def main(argv: Optional[Sequence[str]] = None) -> int:
    from engine.report import find_runs, summarize, tables, write_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="run directories, or folders below which to look")
    parser.add_argument("--out", default=None, help="folder for the summary files (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    runs = find_runs(args.dirs)
    paths = write_summary(runs, Path(args.out or args.dirs[0]))
    print(tables(runs, summarize(runs)))
    for path in paths:
        print(f"wrote {path}")
    return ExitStatus.OK


if __name__ == "__main__":
    from utils.cli import run_main

    sys.exit(run_main(main))
