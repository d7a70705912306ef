"""Signals that end a program: Ctrl-C (SIGINT), SIGTERM and SIGHUP all stop it the same way, and a critical
section (writing a checkpoint) holds them off until it is done.

SIGTERM is what ``kill``, ``timeout``, SLURM's ``scancel`` and ``docker stop`` send; SIGHUP comes when the terminal
closes. Python's default for both is to die at once, skipping every ``finally`` block, so that worker pools are
never stopped. Inside ``handled()`` they raise ``Terminated``, a ``KeyboardInterrupt``, so that the code that cleans
up after Ctrl-C (stopping the CRF pool, the data loaders, wandb) runs for them too.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

TERMINATING = (signal.SIGTERM, signal.SIGHUP)
PARENT_POLL_S = 1.0  # a worker process whose parent died ends within this many seconds
DEFERRABLE = (signal.SIGINT, *TERMINATING)
_received: Optional[int] = None  # the last signal that asked this process to stop


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: the program stops as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_first: list[Callable[[], None]] = []  # run by the handler before it raises (``on_stop``)


def _interrupt(signum: int, frame: object) -> None:
    global _received
    _received = signum
    for callback in list(_first):
        try:
            callback()
        except Exception:  # a failing callback must not keep the signal from stopping the program
            pass
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextlib.contextmanager
def on_stop(callback: Callable[[], None]) -> Iterator[None]:
    """In the block, a stop signal first runs ``callback`` (in the handler, before the exception is raised): for a
    library that would otherwise wait for a helper process after the exception (wandb waits for its service)."""
    _first.append(callback)
    try:
        yield
    finally:
        _first.remove(callback)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """In the block, Ctrl-C raises KeyboardInterrupt and SIGTERM or SIGHUP raise ``Terminated`` in the main thread;
    the previous handlers come back afterwards.

    A signal this process was told to ignore stays ignored (``nohup`` ignores SIGHUP, a shell's background job
    SIGINT)."""
    global _received
    _received = None
    previous = {signum: signal.getsignal(signum) for signum in DEFERRABLE}
    for signum, handler in previous.items():
        if handler != signal.SIG_IGN:
            signal.signal(signum, _interrupt)
    sys.unraisablehook = functools.partial(_quiet_after_stop, sys.unraisablehook)  # stays for the process's end
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check() -> None:
    """Raise now for a stop signal that arrived earlier, in case its exception was lost: Python ignores exceptions
    raised where it cannot propagate them (while worker processes are forked, in finalizers). Loops call this once
    per step; when the first exception did propagate, they are not running any more."""
    if _received is not None:
        raise KeyboardInterrupt if _received == signal.SIGINT else Terminated(_received)


def _quiet_after_stop(hook: Callable[[object], None], unraisable: object) -> None:
    """``sys.unraisablehook`` (around ``hook``) that is silent once a stop signal arrived: the finalizers of
    half-stopped worker pools fail then (a worker already ended by the same signal), and their tracebacks would bury
    the one line that says why the program ends."""
    if _received is None:
        hook(unraisable)


@contextlib.contextmanager
def ignored(signum: int) -> Iterator[None]:
    """Ignore ``signum`` in the block (main thread only); processes started meanwhile inherit the ignoring."""
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def signal_of(err: KeyboardInterrupt) -> int:
    """The signal behind a KeyboardInterrupt: its own for ``Terminated``, else the one received, else SIGINT."""
    if isinstance(err, Terminated):
        return err.signum
    return _received or signal.SIGINT


def received() -> Optional[int]:
    """The signal that asked the process to stop, if one did (its exception may have been replaced on the way)."""
    return _received


def exit_status(signum: int) -> int:
    """128 + the signal number, as a shell reports a process ended by it (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + signum


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold off Ctrl-C, SIGTERM and SIGHUP in the block: one that arrives meanwhile takes effect when it ends.

    Used around writing a file, which an exception in the middle would leave half-written (torch's writer even turns
    a KeyboardInterrupt into a RuntimeError). Outside the main thread, where handlers cannot be changed, a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in DEFERRABLE}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            _deliver(pending[0], previous[pending[0]])


def _deliver(signum: int, handler: object) -> None:
    """Act on a held-off signal as its handler would have."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)


def worker_process_setup(parent: int) -> None:
    """Call first in a worker process (a pool's initializer): leave Ctrl-C to ``parent``, end at once on SIGTERM or
    SIGHUP, and end within about a second once ``parent`` is gone, however it ended.

    A terminal sends Ctrl-C to every process of the job; the parent stops its workers itself, so workers that also
    raised KeyboardInterrupt would only print tracebacks. A parent killed with SIGKILL stops nothing: its workers
    would wait for work forever, adopted by the init process. ``parent`` is the parent's pid as the parent knew it
    (it may be dead already while the worker starts)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in TERMINATING:  # a forked worker inherits the parent's handlers: SIGTERM from its pool just ends it
        if signal.getsignal(signum) != signal.SIG_IGN:  # ignored as its parent ignores it (nohup): so be it
            signal.signal(signum, signal.SIG_DFL)
    # The thread that hands a data-loader batch's shared memory to the parent (multiprocessing's resource sharer,
    # which reports through sys.excepthook) fails on a connection the parent closed when the parent stops in the
    # middle of taking it (Ctrl-C): the parent says why the program ends, the worker says nothing about it.
    sys.excepthook = functools.partial(_quiet_about_a_closed_connection, sys.excepthook)
    threading.excepthook = functools.partial(_quiet_about_a_closed_connection, threading.excepthook)
    threading.Thread(target=_when_parent_ends, args=(parent, functools.partial(os._exit, 1)), daemon=True).start()


CLOSED_CONNECTION = (BrokenPipeError, ConnectionResetError)


def _quiet_about_a_closed_connection(hook: Callable[..., None], *args: object) -> None:
    """``sys.excepthook`` (``hook(type, value, traceback)``) or ``threading.excepthook`` (``hook(args)``, whose
    ``exc_type`` is the type) that is silent for ``CLOSED_CONNECTION``."""
    exc_type = args[0] if len(args) == 3 else args[0].exc_type
    if not (isinstance(exc_type, type) and issubclass(exc_type, CLOSED_CONNECTION)):
        hook(*args)


def stop_with_parent(parent: int, log: Path) -> None:
    """A program started by ``parent`` (a sweep's run): once ``parent`` is gone, however it ended (SIGKILL, which it
    cannot pass on), stop as on SIGTERM, with the output from then on appended to ``log``: ``parent`` held the other
    end of its pipes, and a write into a pipe nobody reads fails."""
    stop = functools.partial(_orphaned, parent, log)
    threading.Thread(target=_when_parent_ends, args=(parent, stop), daemon=True).start()


def _orphaned(parent: int, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for target in (1, 2):  # what is still buffered goes there too
        os.dup2(fd, target)
    os.close(fd)
    print(f"the process that started this one (pid {parent}) has ended: stopping as on SIGTERM", file=sys.stderr,
          flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _when_parent_ends(parent: int, then: Callable[[], None]) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    then()
