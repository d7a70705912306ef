"""The pydensecrf backend in a pool of worker processes that refine while the caller computes the next batch::

    with CRFPool(cfg.eval.crf_workers) as crf:
        for batch in loader:
            ...                                   # network forward, scores at label resolution
            for i in range(len(images)):
                crf.submit(first + i, denormalize_to_uint8(images[i]), scores[i].float().cpu().numpy())
            for index, labels in crf.ready():     # finished results, in submission order, without waiting
                ...
        for index, labels in crf.results():       # the rest, waiting for each
            ...

Results are identical to refining in a loop. The pool never uses ``fork``: STEGO's ``multiprocessing.Pool`` forked
a process that had CUDA and threads running, which can deadlock (STEGO issues #12 and #16). Workers receive numpy
arrays only, ignore Ctrl-C (the caller's context manager stops them), end by themselves within a second or two when
the caller dies without stopping them, and a worker's exception, or a worker that dies, is raised in the caller as
``CRFError`` naming the image. At most ``max_in_flight`` tasks are queued or running; finished results wait in the
pool until ``ready()`` or ``results()`` takes them, so a caller that collects after every batch keeps memory bounded.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import resource_tracker
from typing import Hashable, Iterator, Literal, Optional

import numpy as np

from crf.pydensecrf_backend import check_inputs, refine
from utils.distributed import local_world_size
from utils.signals import ignored, worker_process_setup

START_METHOD = "spawn"  # never fork a process that may hold CUDA or threads; also the only method on every OS
WORKER_EXIT_S = 10.0  # a terminated worker is gone long before this; the bound only avoids waiting forever
IN_FLIGHT_PER_WORKER = 2  # one task running and one queued, so that a worker never waits for the caller
WORKER_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # one thread per worker

Output = Literal["labels", "probs"]
OUTPUTS = ("labels", "probs")


class CRFError(RuntimeError):
    """The dense CRF failed on one image; the original exception is chained as the cause."""


def _refine(image: np.ndarray, scores: np.ndarray, output: Output) -> np.ndarray:
    check_inputs(image, scores)
    probs = refine(image, scores)
    return probs.argmax(axis=0) if output == "labels" else probs


def _init_worker(caller: int) -> None:
    worker_process_setup(caller)  # the caller's context manager stops the workers; a dead caller, themselves
    # The CRF is single-threaded; keep libraries that start thread pools later (OpenMP, MKL) at one thread each.
    for name in WORKER_THREAD_ENV:
        os.environ[name] = "1"
    torch = sys.modules.get("torch")  # imported when the caller's main module imports it (spawn re-imports it)
    if torch is not None:
        torch.set_num_threads(1)


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (which the pool needs) with SIGHUP ignored. A closing terminal sends
    SIGHUP to every process of the job: a tracker killed by it is relaunched by the caller, which then prints
    tracebacks about leaked semaphores, while the caller itself stops on SIGHUP anyway."""
    with ignored(signal.SIGHUP):
        resource_tracker.ensure_running()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(workers: Optional[int]) -> int:
    """``eval.crf_workers``: None -> the usable cores (shared by the data-parallel processes of this machine, each
    with its own pool), 0 -> serial in the caller's process."""
    if workers is None:
        return max(1, usable_cores() // local_world_size())
    if workers < 0:
        raise ValueError(f"crf_workers must be >= 0 or None (got {workers})")
    return workers


def _failure(index: Hashable, error: BaseException) -> CRFError:
    return CRFError(f"dense CRF failed on image {index}: {type(error).__name__}: {error}")


class CRFPool:
    """Dense CRF on many images: ``submit`` returns at once, results come back in submission order.

    ``workers``: processes (None = usable cores, 0 = serial in this process, same interface). ``output``:
    "labels" yields HxW int64 argmax maps, "probs" the CxHxW float32 probabilities. ``max_in_flight``: tasks
    queued or running before ``submit`` waits (default two per worker). Use it as a context manager: leaving the
    block normally waits for running tasks; leaving it by an exception (Ctrl-C included) terminates the workers.
    """

    def __init__(self, workers: Optional[int] = None, output: Output = "labels",
                 max_in_flight: Optional[int] = None) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS} (got {output!r})")
        self.workers = resolve_workers(workers)
        self.output = output
        self.max_in_flight = IN_FLIGHT_PER_WORKER * max(self.workers, 1) if max_in_flight is None else max_in_flight
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 (got {self.max_in_flight})")
        self._tasks: deque[tuple[Hashable, Future]] = deque()
        self._closed = False
        self._executor: Optional[ProcessPoolExecutor] = None
        if self.workers > 0:
            _start_resource_tracker()
            self._executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(START_METHOD),
                                                 initializer=_init_worker, initargs=(os.getpid(),))

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[tuple[Hashable, np.ndarray]]:
        return self.results()

    def submit(self, index: Hashable, image: np.ndarray, scores: np.ndarray) -> None:
        """Queue one image (HxWx3 uint8 RGB) and its CxhxW scores; waits only while the pool is full.

        ``index`` identifies the result (an image index, or any key such as ``(index, "cluster")``). A failure of
        an earlier task is raised here if it is already known.
        """
        if self._closed:
            raise RuntimeError("submit() on a closed CRFPool")
        self._raise_known_failure()
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(_refine(image, scores, self.output))
            except Exception as error:
                raise _failure(index, error) from error
            self._tasks.append((index, future))
            return
        self._wait_for_room()
        # Copies: the arrays are pickled later by a feeder thread, and the caller may reuse their memory (numpy views
        # of torch tensors) before that. Negligible next to the CRF itself.
        task = self._executor.submit(_refine, np.array(image), np.array(scores), self.output)
        self._tasks.append((index, task))

    def ready(self) -> Iterator[tuple[Hashable, np.ndarray]]:
        """(index, result) of the finished tasks at the front of the queue, in submission order, without waiting."""
        while self._tasks and self._tasks[0][1].done():
            yield self._pop()

    def results(self) -> Iterator[tuple[Hashable, np.ndarray]]:
        """(index, result) of every submitted task not yet collected, in submission order, waiting for each."""
        while self._tasks:
            yield self._pop()

    def close(self) -> None:
        """Drop uncollected tasks, wait for the running ones and stop the workers."""
        self._closed = True
        self._tasks.clear()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True, cancel_futures=True)

    def terminate(self) -> None:
        """Drop all tasks and kill the workers now (used on errors and Ctrl-C)."""
        self._closed = True
        self._tasks.clear()
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        # ProcessPoolExecutor has no public handle on its workers before Python 3.14 (terminate_workers()). Its
        # manager thread sees them die, fails their futures and reaps them: wait for it rather than joining the
        # processes here, which would race with it.
        processes = list((executor._processes or {}).values())
        for process in processes:
            process.terminate()
        # A worker killed while it sent a result leaves half a message in the result pipe, and the manager thread
        # would wait for the rest forever (and shutdown with it). Once every worker is dead, close this process's
        # end of that pipe too: the manager thread then reads end-of-file, takes the pool as broken and stops.
        multiprocessing.connection.wait([process.sentinel for process in processes], timeout=WORKER_EXIT_S)
        executor._result_queue._writer.close()
        executor.shutdown(wait=True, cancel_futures=True)

    def _pop(self) -> tuple[Hashable, np.ndarray]:
        index, future = self._tasks[0]
        error = future.exception()  # waits for the task
        self._tasks.popleft()
        if error is not None:
            raise _failure(index, error) from error
        return index, future.result()

    def _raise_known_failure(self) -> None:
        for index, future in self._tasks:
            error = future.exception() if future.done() else None
            if error is not None:
                raise _failure(index, error) from error

    def _wait_for_room(self) -> None:
        while True:
            running = [future for _, future in self._tasks if not future.done()]
            if len(running) < self.max_in_flight:
                return
            wait(running, return_when=FIRST_COMPLETED)
            self._raise_known_failure()
