"""Errors caused by the user's input, how they are told, and the exit statuses of the commands.

Every mistake a user can make (a bad option file, a missing data folder, a weight file that does not fit)
raises a subclass of ``UserError``. Entry points turn it into one line on stderr and exit status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    """What run.py, eval.py, predict.py and the sweep return; a stop by a signal returns 128 + its number
    (``utils.signals.exit_status``), as a shell reports it."""

    OK = 0
    FAILED = 1  # the run could not go on (a non-finite loss, another process of the run ended), or work failed
    USER_ERROR = 2  # as argparse: the user's input was wrong


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(UserError):
    """An option file or command-line override is invalid."""


class WeightsError(UserError):
    """A weight file or checkpoint does not fit the model it should be loaded into."""


class DataError(UserError):
    """A dataset on disk is missing, incomplete or malformed."""


class OutputError(UserError):
    """An output cannot be written: a full disk, a read-only filesystem, a folder where a file should go."""


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


def describe_os_error(err: OSError) -> str:
    """"PATH: the OS's reason" (e.g. "No space left on device"), or the message when the error names no path."""
    if err.filename is None:
        return one_line(err)
    target = f" -> {err.filename2}" if err.filename2 is not None else ""
    return f"{err.filename}{target}: {err.strerror or one_line(err)}"
