"""Download and unpack the STEGO-format datasets.

    python dataset/dataset_download.py --data_path /data [cocostuff cityscapes potsdam potsdamraw]

With no names, all four. Interrupted downloads resume; unpacked datasets are skipped. Exit status 2 on errors.
"""
import sys
from pathlib import Path

if not __package__:  # run as `python dataset/<script>.py`: import from the repo root, not from dataset/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

from dataset.download import DOWNLOAD_NAMES, STEGO_DATA_URL, download_datasets  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import ExitStatus  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Download and unpack the STEGO-format datasets.")
    parser.add_argument("--data_path", required=True, help="folder that receives one sub-folder per dataset")
    parser.add_argument("names", nargs="*", help=f"datasets to fetch (default: all of {', '.join(DOWNLOAD_NAMES)})")
    parser.add_argument("--base_url", default=STEGO_DATA_URL, help="where the {name}.zip archives are")
    parser.add_argument("--keep_archives", action="store_true", help="keep the .zip files after unpacking")
    args = parser.parse_args(argv)
    for folder in download_datasets(args.data_path, args.names or DOWNLOAD_NAMES, args.base_url, args.keep_archives):
        print(f"ready: {folder}")
    return ExitStatus.OK


if __name__ == "__main__":
    sys.exit(run_main(main))
