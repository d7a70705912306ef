"""What run.py and eval.py share: the original's command-line flags, dotted overrides and the exit-status rule."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

from utils.config import Config, load_config
from utils.errors import UserError

EXIT_USER_ERROR = 2  # as argparse: the user's input was wrong
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def base_parser(description: str, opt_required: bool = True) -> argparse.ArgumentParser:
    """The original's flags ``--opt FILE [--debug] [--test] [--checkpoint X] [--data_path DIR]``, then
    ``[dotted.key=value ...]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--opt", required=opt_required, help="JSON option file")
    parser.add_argument("--debug", action="store_true", help="debug mode: wandb disabled")
    parser.add_argument("--test", action="store_true",
                        help="test mode: evaluate only, never train, wandb disabled")
    parser.add_argument("--checkpoint", default=None, help="the checkpoint to evaluate (eval.py)")
    parser.add_argument("--data_path", default=None, help="dataset.data_path override")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted option overrides, e.g. train.epoch=1 dataset.res=224")
    return parser


def overrides_from_args(args: argparse.Namespace) -> list:
    """The command line's dotted overrides, ``--data_path`` among them (taken verbatim, not parsed)."""
    overrides: list = list(args.overrides)
    if args.data_path is not None:
        overrides.append(("dataset.data_path", args.data_path))
    return overrides


def config_from_args(args: argparse.Namespace) -> Config:
    """The option file with the command line's overrides applied."""
    return load_config(args.opt, overrides_from_args(args))


def one_line(err: BaseException) -> str:
    """The message of ``err``; for an error re-raised from a DataLoader worker, the original message only.

    torch re-raises a worker's exception with the same type and a message that holds the worker's whole
    traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); its last line is
    "module.Type: message".
    """
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)``; a ``UserError`` becomes one line on stderr and exit status 2, Ctrl-C status 130."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
