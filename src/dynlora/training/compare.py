"""Side-by-side runs of several methods on several tasks and seeds, resumable, summarised as mean ± std.

Each finished run appends one line to ``results.jsonl``; a run that was interrupted resumes from its checkpoint;
a run already in the file is skipped. So an interrupted comparison, started again with the same command, picks up
where it stopped. Settings: the shared ones (``base``), then ``per_task[task]``, then ``per_method[method]``.

A name in ``methods`` may be a variant of a method: ``per_method: {dynamic-noinput: {method: dynamic, adapter:
{input_adaptive: null}}}`` runs Dynamic LoRA without input adaptation under the name ``dynamic-noinput`` (its own run
directory, its own row in the table).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base_model import quiet_transformers
from .checkpoint import latest_checkpoint
from .data import task_spec
from .fields import from_mapping, merge
from .loop import TrainingRun
from .metrics import MAIN_METRICS, run_score
from .pool import run_in_pool
from .settings import DEFAULT_METHODS, METHODS, SETTINGS, TrainSettings, as_saved

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
        """The typed settings of one run: ``base``, then ``per_task[task]``, then ``per_method[method]``."""
        merged = merge(self.base, self.per_task.get(task, {}), self.per_method.get(method, {}))
        run_dir = Path(self.output_dir) / task / method / f"seed{seed}"
        actual = merged.pop("method", method)  # a variant names the method it runs
        return {**merged, "task": task, "method": actual, "seed": seed, "output_dir": str(run_dir)}

    def check(self) -> None:
        """Build every run's settings once, so a wrong one fails before hours of runs, not in the middle."""
        for task in self.tasks:
            for method in self.methods:
                settings = self.settings(task, method, self.seeds[0])
                if settings["method"] not in METHODS:
                    raise ValueError(
                        f"unknown method {method!r}; choose from {', '.join(METHODS)}, or name a variant "
                        f"in the plan file: per_method: {{{method}: {{method: dynamic, ...}}}}"
                    )
                TrainSettings.from_settings(settings)


PLAN_KEYS = ("tasks", "methods", "seeds", "output_dir", "base", "per_task", "per_method")


def _csv(value: str | list | None) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def plan_from(
    plan_file: dict[str, Any],
    where: str,
    flags: dict[str, Any],
    tasks: str | None = None,
    methods: str | None = None,
    seeds: str | None = None,
) -> ComparePlan:
    """A plan from a plan file's mapping (``where`` names it in errors), with typed ``flags`` over its ``base`` and
    the command's ``tasks``/``methods``/``seeds`` over its own."""
    unknown = sorted(set(plan_file) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(sorted(PLAN_KEYS))}")

    def typed(data: Any, part: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise ValueError(f"{where}: {part} must be a mapping of settings, got {data!r}")
        return from_mapping(data, SETTINGS, f"{where}: {part}")

    base = merge(typed(plan_file.get("base") or {}, "base"), flags)
    output_dir = base.pop("output_dir", None) or plan_file.get("output_dir") or "runs/compare"
    per_task = {t: typed(v or {}, f"per_task.{t}") for t, v in (plan_file.get("per_task") or {}).items()}
    per_method = {m: typed(v or {}, f"per_method.{m}") for m, v in (plan_file.get("per_method") or {}).items()}
    seed_list = _csv(seeds if seeds is not None else plan_file.get("seeds", "0,1,2"))
    if not all(s.lstrip("-").isdigit() for s in seed_list):
        raise ValueError(f"--seeds must be comma-separated whole numbers, got {','.join(seed_list)}")
    return ComparePlan(
        tasks=[Path(base["train_file"]).name]
        if base.get("train_file")
        else [task_spec(t).name for t in _csv(tasks or plan_file.get("tasks") or "sst2")],
        methods=_csv(methods or plan_file.get("methods") or ",".join(DEFAULT_METHODS)),
        seeds=[int(s) for s in seed_list],
        output_dir=output_dir,
        base=base,
        per_task=per_task,
        per_method=per_method,
    )


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


def train_one(settings: dict[str, Any]) -> dict[str, Any]:
    """One run of a comparison (module level: ``--jobs`` sends it to worker processes)."""
    quiet_transformers()
    return TrainingRun(TrainSettings.from_settings(settings)).run()


def run_comparison(
    plan: ComparePlan,
    train_fn: Callable[[dict[str, Any]], dict[str, Any]] = train_one,
    log: Callable[[str], None] = print,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Run every (task, method, seed) not yet in results.jsonl; returns all results.

    ``jobs`` > 1 runs that many trainings at once in worker processes (pool.py; ``train_fn`` must then be
    picklable: a module-level function)."""
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
        settings = as_saved(settings, settings["output_dir"]) if resume else settings
        todo.append(
            (
                f"[{i}/{len(grid)}] {task} {method} seed {seed}" + (" (resuming)" if resume else ""),
                (task, method, seed),
                {**settings, "resume": resume},
            )
        )

    def record(key: tuple[str, str, int], settings: dict[str, Any], result: dict[str, Any]) -> None:
        kept = {k: v for k, v in result.items() if k not in ("task", "method", "seed")}
        append_result(path, {"task": key[0], "method": key[1], "runs": settings["method"], "seed": key[2], **kept})

    if jobs <= 1:
        for message, key, settings in todo:
            log(message)
            record(key, settings, train_fn(settings))
    else:
        for (message, key, settings), result in run_in_pool(train_fn, [t[2] for t in todo], todo, jobs):
            record(key, settings, result)
            log(message.replace("] ", "] done: ", 1))
    return read_results(path)


def shown_score(metrics: dict[str, dict[str, float]]) -> float:
    """What a table shows of a run: its main metric × 100, or a language model's loss as it is (lower is better)."""
    if all("loss" in split for split in metrics.values()):
        return float(sum(split["loss"] for split in metrics.values()) / len(metrics))
    return 100 * run_score(metrics)


def metric_label(task: str, results: list[dict[str, Any]]) -> str:
    """How a table's column names the score: the GLUE metric, loss (lower is better) or accuracy/correlation."""
    if task in MAIN_METRICS:
        return "/".join(MAIN_METRICS[task])
    metrics = next((r["metrics"] for r in results if r["task"] == task), {})
    split = next(iter(metrics.values()), {})
    return "loss, lower is better" if "loss" in split else "/".join(k for k in split if k != "main") or "main"


def seed_stats(results: list[dict[str, Any]], task: str, method: str) -> tuple[float, float, int] | None:
    """(mean, std, n) over seeds of the shown score of ``method`` on ``task``; None before any run ended."""
    scores = [shown_score(r["metrics"]) for r in results if r["task"] == task and r["method"] == method]
    if not scores:
        return None
    return statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0, len(scores)


def summary_table(results: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> str:
    """Markdown: methods × tasks, mean ± std (×100) of the task's main metric over seeds, and the average."""
    header = "| method | params | " + " | ".join(f"{t} ({metric_label(t, results)})" for t in tasks) + " | avg |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for method in methods:
        stats = [seed_stats(results, task, method) for task in tasks]
        cells = ["—" if st is None else f"{st[0]:.2f} ± {st[1]:.2f} (n={st[2]})" for st in stats]
        means = [st[0] for st in stats if st is not None]
        avg = f"{statistics.mean(means):.2f}" if len(means) == len(tasks) else "—"
        counts = {
            (r["trainable_parameters"], r.get("peak_trainable_parameters", 0))
            for r in results
            if r["method"] == method and r.get("trainable_parameters") is not None
        }  # an over-parameterised start is pruned while training: its final count, and its peak beside it
        shown = ", ".join(f"{n:,}" + (f" (peak {peak:,})" if peak > n else "") for n, peak in sorted(counts)) or "—"
        lines.append(f"| {method} | {shown} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)
