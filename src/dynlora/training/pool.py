"""``dynlora compare --jobs N``: several trainings at once in worker processes, each on an equal share of the CPU
threads (on a small CPU several single-threaded runs finish more work per hour than one run on every core).

Faults: Ctrl-C reaches the workers from the terminal, a SIGTERM to the parent is passed on, and a worker whose parent
died (SIGKILL) signals itself; in every case a running training saves its checkpoint and queued runs do not start.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

Tag = TypeVar("Tag")

_ORPHANED, _BUSY, _STOP = threading.Event(), threading.Event(), threading.Event()


class Stopped(Exception):
    """A --jobs worker refused a queued run because the comparison is stopping."""


def _init_worker(threads: int) -> None:
    """A --jobs worker: its share of the threads; a signal makes it take no further run (a training in progress
    handles the signal itself: it saves and stops); and a watch on the parent: if the parent dies without passing
    a signal on (SIGKILL), the worker sends itself SIGTERM so a running training saves a checkpoint, then exits."""
    import torch

    torch.set_num_threads(threads)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: _STOP.set())
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _ORPHANED.set()
        if not _BUSY.is_set():
            os._exit(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves, stops, and _in_worker exits

    threading.Thread(target=watch, daemon=True).start()


def _in_worker(train_fn: Callable[[dict[str, Any]], dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    # The executor queues a run or two ahead; once the comparison is stopping, those must not start.
    if _STOP.is_set():
        raise Stopped
    _BUSY.set()
    try:
        return train_fn(settings)
    except BaseException:
        _STOP.set()  # interrupted or failed: the parent stops the comparison
        raise
    finally:
        _BUSY.clear()
        if _ORPHANED.is_set():
            os._exit(1)  # nobody is left to take the result; the checkpoint is saved


def run_in_pool(
    train_fn: Callable[[dict[str, Any]], dict[str, Any]], runs: list[dict[str, Any]], tags: list[Tag], jobs: int
) -> Iterator[tuple[Tag, dict[str, Any]]]:
    """Train every settings of ``runs`` (``jobs`` at a time); yield ``(tag, result)`` as each finishes. Raises
    KeyboardInterrupt once every running training has saved, when the comparison was stopped."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(threads,)
    )

    def on_sigterm(signum: int, _frame: object) -> None:
        # Ctrl-C reaches the workers from the terminal; a SIGTERM sent to this process alone is passed on, so
        # every running training saves its checkpoint before the comparison stops.
        for worker in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        running = {
            pool.submit(_in_worker, train_fn, {**settings, "progress": False}): tag
            for settings, tag in zip(runs, tags, strict=True)
        }
        stopped = False
        for future in as_completed(running):
            try:
                result = future.result()  # a failed run stops the comparison, after the others stop
            except Stopped:
                stopped = True  # a worker was signalled; the cause (if a failure) is raised by its own future
                continue
            yield running[future], result
        if stopped:
            raise KeyboardInterrupt
    except BaseException:
        # Cancel what has not started; running trainings got the signal too: they save and exit (resumable).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
