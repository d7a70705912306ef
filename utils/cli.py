"""What run.py and eval.py share: the original's command-line flags, dotted overrides and the exit-status rule."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable, Optional, Sequence

from config import Config, load_config
from utils import signals
from utils.distributed import ReportedByMain, group_formed, peer_lost, process_rank
from utils.errors import ExitStatus, UserError, describe_os_error, one_line

OUR_PACKAGES = ("engine", "model", "loss", "dataset", "utils")


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


def sets_on_command_line(args: argparse.Namespace, key: str) -> bool:
    """Whether one of the command line's dotted overrides sets ``key``."""
    return any(item.partition("=")[0].strip() == key for item in args.overrides)


def config_from_args(args: argparse.Namespace) -> Config:
    """The option file with the command line's overrides applied."""
    return load_config(args.opt, overrides_from_args(args))


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Call ``main(argv)`` and turn how it ended into one line on stderr and an exit status: a ``UserError`` or a
    filesystem error (a folder that cannot be created, a full disk) 2; Ctrl-C 130, SIGTERM 143, SIGHUP 129.

    Of the data-parallel processes (torchrun), process 0 speaks for all: the others log only errors, say nothing
    when stopped, and print a user error only when they found it alone (after the processes met; before, all of
    them read the same options and fail alike)."""
    main_process = process_rank() == 0
    # Our own messages from INFO up; other libraries' (torch logs statistics at exit) from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.INFO if main_process else logging.ERROR)
    with signals.handled():
        status = _status_of(main, argv, main_process)
        if status != 0 and group_formed():
            # torchrun stops the other processes (SIGTERM) as soon as one of them ends with an error, and the
            # processes of one run end together: leave at once, deaf to that signal, so that each keeps its status
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status


def _status_of(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]],
               main_process: bool) -> int:
    try:
        return main(argv)
    except ReportedByMain:  # process 0 prints it
        return ExitStatus.USER_ERROR
    except UserError as err:
        if main_process or group_formed():
            print(f"error: {one_line(err)}", file=sys.stderr)
        return ExitStatus.USER_ERROR
    except KeyboardInterrupt as err:
        return _stopped(signals.signal_of(err), main_process)
    except OSError as err:
        if main_process or group_formed():
            print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return ExitStatus.USER_ERROR
    except BaseException as err:
        if signals.received() is not None:  # the signal's exception was replaced by one of the cleanup's
            return _stopped(signals.received(), main_process)
        if peer_lost(err):  # torchrun stops this process too (SIGTERM); say why first, in one line
            print(f"error: process {process_rank()}: another process of this run has ended, so this one stops too "
                  f"({_first_sentence(err)})", file=sys.stderr)
            return ExitStatus.FAILED
        raise


def _first_sentence(err: BaseException) -> str:
    """"Connection closed by peer [127.0.0.1]:33937" of "[.../gloo/transport/tcp/pair.cc:561] Connection closed by
    peer [127.0.0.1]:33937. This is typically caused by ..."."""
    text = str(err).strip() or type(err).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.splitlines()[0].split(". ")[0].rstrip(".")


def _stopped(signum: int, say: bool = True) -> int:
    if say:
        print("interrupted" if signum == signal.SIGINT else f"terminated ({signal.Signals(signum).name})",
              file=sys.stderr)
    return signals.exit_status(signum)
