"""Side-by-side runs of several methods on several tasks and seeds, resumable, summarised as mean ± std.

Each finished run appends one line to ``results.jsonl``; a run that was interrupted resumes from its checkpoint;
a run already in the file is skipped. So an interrupted comparison, started again with the same command, picks up
where it stopped. Settings: the shared ones (``base``), then ``per_task[task]``, then ``per_method[method]``.

A name in ``methods`` may be a variant of a method: ``per_method: {dynamic-nogate: {method: dynamic, adapter:
{input_adaptive: null}}}`` runs Dynamic LoRA without the gate under the name ``dynamic-nogate`` (its own run
directory, its own row in the table).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import latest_checkpoint
from .metrics import MAIN_METRICS, run_score

RESULTS = "results.jsonl"


@dataclass
class ComparePlan:
    tasks: list[str]
    methods: list[str]
    seeds: list[int]
    output_dir: str = "runs/compare"
    base: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)

    def settings(self, task: str, method: str, seed: int) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for layer in (self.base, self.per_task.get(task, {}), self.per_method.get(method, {})):
            for key, value in layer.items():
                if key == "adapter":
                    merged["adapter"] = {**merged.get("adapter", {}), **value}
                else:
                    merged[key] = value
        run_dir = Path(self.output_dir) / task / method / f"seed{seed}"
        actual = merged.pop("method", method)  # a variant names the method it runs
        return {**merged, "task": task, "method": actual, "seed": seed, "output_dir": str(run_dir)}


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_result(path: Path, record: dict[str, Any]) -> None:
    """One line per finished run, flushed to disk before the next run starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


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


def run_comparison(plan: ComparePlan, train_fn: Callable[[dict[str, Any]], dict[str, Any]],
                   log: Callable[[str], None] = print, jobs: int = 1) -> list[dict[str, Any]]:  # fmt: skip
    """Run every (task, method, seed) not yet in results.jsonl; returns all results.

    ``jobs`` > 1 runs that many trainings at once in worker processes, each with an equal share of the CPU threads
    (``train_fn`` must then be picklable: a module-level function). On a small CPU several single-threaded runs
    finish more work per hour than one run using every core.
    """
    out = Path(plan.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = {(r["task"], r["method"], r["seed"]) for r in read_results(path)}
    grid = [(t, m, s) for t in plan.tasks for m in plan.methods for s in plan.seeds]
    todo = []
    for i, (task, method, seed) in enumerate(grid, start=1):
        if (task, method, seed) in done:
            continue
        settings = plan.settings(task, method, seed)
        resume = latest_checkpoint(Path(settings["output_dir"]) / "checkpoints") is not None
        todo.append((f"[{i}/{len(grid)}] {task} {method} seed {seed}" + (" (resuming)" if resume else ""),
                     (task, method, seed), {**settings, "resume": resume}))  # fmt: skip

    def record(key: tuple[str, str, int], settings: dict[str, Any], result: dict[str, Any]) -> None:
        kept = {k: v for k, v in result.items() if k not in ("task", "method", "seed")}
        append_result(path, {"task": key[0], "method": key[1], "runs": settings["method"], "seed": key[2], **kept})

    if jobs <= 1:
        for message, key, settings in todo:
            log(message)
            record(key, settings, train_fn(settings))
        return read_results(path)

    threads = max(1, (os.cpu_count() or 1) // jobs)
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))  # fmt: skip

    def on_sigterm(signum: int, _frame: object) -> None:
        # Ctrl-C reaches the workers from the terminal; a SIGTERM sent to this process alone is passed on, so
        # every running training saves its checkpoint before the comparison stops.
        for worker in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        running = {}
        for message, key, settings in todo:
            running[pool.submit(_in_worker, train_fn, {**settings, "progress": False})] = (message, key, settings)
        stopped = False
        for future in as_completed(running):
            message, key, settings = running[future]
            try:
                result = future.result()  # a failed run stops the comparison, after the others stop
            except Stopped:
                stopped = True  # a worker was signalled; the cause (if a failure) is raised by its own future
                continue
            record(key, settings, result)
            log(message.replace("] ", "] done: ", 1))
        if stopped:
            raise KeyboardInterrupt
    except BaseException:
        # Cancel what has not started; running trainings got the signal too: they save and exit (resumable).
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    return read_results(path)


def seed_stats(results: list[dict[str, Any]], task: str, method: str) -> tuple[float, float, int] | None:
    """(mean, std, n) over seeds of the main metric × 100 of ``method`` on ``task``; None before any run ended."""
    scores = [100 * run_score(r["metrics"]) for r in results if r["task"] == task and r["method"] == method]
    if not scores:
        return None
    return statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0, len(scores)


def summary_table(results: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> str:
    """Markdown: methods × tasks, mean ± std (×100) of the task's main metric over seeds, and the average."""
    header = "| method | params | " + " | ".join(f"{t} ({'/'.join(MAIN_METRICS[t])})" for t in tasks) + " | avg |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for method in methods:
        stats = [seed_stats(results, task, method) for task in tasks]
        cells = ["—" if st is None else f"{st[0]:.2f} ± {st[1]:.2f} (n={st[2]})" for st in stats]
        means = [st[0] for st in stats if st is not None]
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(tasks) else "—"
        params = {r.get("trainable_parameters") for r in results if r["method"] == method} - {None}
        shown = ", ".join(f"{p:,}" for p in sorted(params)) or "—"
        lines.append(f"| {method} | {shown} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)
