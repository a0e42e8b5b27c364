"""The quality benchmark, protocol v2: a plan through `dynlora compare`, then its section of RESULTS.md.

    python benchmarks/glue_v2.py [--plan benchmarks/glue_v2_plan.yaml] [--jobs 1] [--output-dir DIR] [--no-run]

Plans (TABLES): glue_v2_plan.yaml, the encoder table (MiniLM-L6, every linear layer, into runs/glue-v2), and
decoder_plan.yaml, the decoder table (SmolLM2-135M, SST-2 as an instruction, into runs/decoder; its floor is the
untrained model's zero-shot score, measured once by `dynlora eval` and kept in the output directory).

Resumable (start the same command again and only what is missing runs); each invocation's wall time is appended
to OUTPUT_DIR/wall_time.jsonl. Then, from whatever has finished (marked partial until every run has): the table
(final dev main metric × 100, mean ± std over seeds), the per-epoch dev curves, the final ranks of Dynamic LoRA,
and Dynamic LoRA's paired differences to every other method with 95 % bootstrap intervals over seeds and dev
examples (class Resampled), against the targets of benchmarks/README.md. Raw per-run results:
benchmarks/results/<table>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import zlib
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import yaml
from common import write_section
from glue import run_timed
from matplotlib.figure import Figure

from dynlora.training.compare import read_results, summary_table
from dynlora.training.metrics import glue_metrics, run_score
from dynlora.training.report import write_report
from dynlora.training.run_log import read_log

HERE = Path(__file__).resolve().parent
# What each table's screening rows are, beyond their names (the plans' comments say how each is set).
SCREEN_NOTES = {
    "glue_v2": """`dynamic-gradinit` is the former default, components started along the first step's loss
gradient: behind the random start on the three seeds' average and on two of them, and stuck at the majority class
for two epochs in every run, it made way for `init: lora` as the default (docs/method.md, section 5). The
`-lr5e-4` LoRA+ rows are LoRA+ (B at 16 × the lr) at the rule's full lr: PEFT's and on Dynamic LoRA alike, they
fell to the majority class (MCC 0) in the first epoch and stayed there, which is why the table's LoRA+ runs at half
the lr, as PEFT's documentation advises. `dynamic-nogate` (re-allocation alone) and `lora-gate` (the input
normalisation alone) ran on all three seeds: `dynamic-nogate` − `lora` is what re-allocation alone does.
`dynamic-perparam` allocates ranks for importance per parameter instead of per rank (`share: parameter`,
docs/method.md section 3); `dynamic-perparam-nogate` is the same without the input normalisation, to pair with
`dynamic-nogate`. `dynamic-rslora` is Dynamic LoRA with rsLoRA's scale alpha / √r (`rslora: true`): paired with
`peft-rslora`, whether the allocation adds to that scale.""",
    "glue_v2_qv": """`dynamic-rslora` is Dynamic LoRA with rsLoRA's scale alpha / √r (`rslora: true`): paired with
`peft-rslora`, whether the allocation adds to that scale.""",
}

# plan file -> (table name: RESULTS.md section and results files, title, default output directory)
TABLES = {
    "glue_v2_plan.yaml": ("glue_v2", "GLUE dev quality, protocol v2 (MiniLM-L6, every linear layer", "runs/glue-v2"),
    "glue_v2_qv_plan.yaml": (
        "glue_v2_qv",
        "GLUE dev quality, protocol v2, query/value only (MiniLM-L6",
        "runs/glue-v2-qv",
    ),
    "decoder_plan.yaml": (
        "decoder",
        "Decoder (SmolLM2-135M-Instruct, SST-2 posed as an instruction, all 7 projections of its 30 layers",
        "runs/decoder",
    ),
}
BASELINES = ("lora", "peft-adalora", "peft-eva", "peft-rslora", "peft-loraplus")
PEFT_TRICKS = ("peft-eva", "peft-rslora", "peft-loraplus")
TARGETS = {"lora": 1.0, "peft-adalora": 0.0, "best of EVA / rsLoRA / LoRA+": 0.0}


def scores(results: list[dict]) -> dict[tuple[str, str, int], float]:
    """(task, method, seed) -> final dev main metric × 100."""
    return {(r["task"], r["method"], r["seed"]): 100 * run_score(r["metrics"]) for r in results}


def paired(score: dict, tasks: list[str], a: str, b: str, seeds: list[int]) -> dict[str, list[float]] | None:
    """Per task, a − b for each seed both finished; None unless every task has every seed of both."""
    out = {
        t: [score[(t, a, s)] - score[(t, b, s)] for s in seeds if (t, a, s) in score and (t, b, s) in score]
        for t in tasks
    }
    return out if all(len(d) == len(seeds) for d in out.values()) else None


# (per-task paired differences of a and b, a, b) -> 95 % interval of their average over tasks
Interval = Callable[[dict[str, list[float]], str, str], tuple[float, float]]


class Resampled:
    """The 95 % interval of a paired difference: each round draws the seeds (with replacement, the same ones for
    both methods) and each task's dev examples (the same ones for every run of the task), scores every drawn run
    on those examples, and averages a − b over the drawn seeds, then over the tasks. It counts both what another
    seed would move (training) and what another dev sample would (evaluation); with one seed, only the second.

    Each run's predictions come from ``dynlora eval --predictions`` on its final adapter, kept in the run directory
    as predictions.jsonl; they must reproduce the run's recorded score."""

    def __init__(self, out: Path, plan: dict, score: dict, rounds: int = 2000) -> None:
        self.out, self.plan, self.score, self.rounds = out, plan, score, rounds
        self.seeds = plan["seeds"]
        self._draws: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._scores: dict[tuple[str, str, int], np.ndarray] = {}

    def __call__(self, diffs: dict[str, list[float]], a: str, b: str) -> tuple[float, float]:
        total = np.zeros(self.rounds)
        for task in diffs:
            # (rounds, seeds): each round's a − b on each seed, then averaged over that round's drawn seeds
            per_seed = np.stack([self.resampled(task, a, s) - self.resampled(task, b, s) for s in self.seeds], 1)
            total += np.take_along_axis(per_seed, self._draws[task][1], 1).mean(1)
        low, high = np.percentile(total / len(diffs), [2.5, 97.5])
        return float(low), float(high)

    def draws(self, task: str, examples: int) -> tuple[np.ndarray, np.ndarray]:
        """Per round, the dev examples (rounds, examples) and the seeds' positions (rounds, seeds) drawn."""
        if task not in self._draws:
            rng = np.random.default_rng(zlib.crc32(task.encode()))
            self._draws[task] = (
                rng.integers(0, examples, (self.rounds, examples)),
                rng.integers(0, len(self.seeds), (self.rounds, len(self.seeds))),
            )
        return self._draws[task]

    def resampled(self, task: str, method: str, seed: int) -> np.ndarray:
        """One run's main metric × 100 on each round's examples."""
        if (task, method, seed) not in self._scores:
            pred, gold = self.predictions(task, method, seed)
            self._scores[(task, method, seed)] = np.array(
                [100 * glue_metrics(task, pred[i], gold[i])["main"] for i in self.draws(task, len(gold))[0]]
            )
        return self._scores[(task, method, seed)]

    def predictions(self, task: str, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        run = self.out / task / method / f"seed{seed}"
        path = run / "predictions.jsonl"
        if not path.is_file():
            base = self.plan["base"]
            command = [sys.executable, "-m", "dynlora.cli", "eval", "--adapter", str(run / "adapter"), "--task", task]
            command += ["--batch-size", str(base["batch_size"]), "--max-length", str(base["max_length"])]
            command += ["--model", base["model"]] if "model" in base else []
            print(f"predictions of {run} (dynlora eval, once)", flush=True)
            subprocess.run([*command, "--predictions", str(path)], check=True, capture_output=True)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        pred, gold = np.array([r["prediction"] for r in rows]), np.array([r["label"] for r in rows])
        recorded = self.score[(task, method, seed)]
        if abs(100 * glue_metrics(task, pred, gold)["main"] - recorded) > 1e-6:
            sys.exit(f"error: {path} does not reproduce the run's recorded score {recorded:.4f}; delete it to redo")
        return pred, gold


def margin_lines(
    score: dict, tasks: list[str], methods: list[str], seeds: list[int], interval: Interval
) -> tuple[list[str], dict]:
    """The target lines (met / not met) and each comparison's (mean, interval) for the chart. The best of
    EVA / rsLoRA / LoRA+ is the best of those the table runs (the decoder table runs the encoder table's best)."""
    rows, chart = [], {}
    tricks = [m for m in PEFT_TRICKS if m in methods]
    best_trick = best_of_tricks(score, tasks, methods, seeds)
    for label, baseline in [
        ("lora", "lora"),
        ("peft-adalora", "peft-adalora"),
        ("best of EVA / rsLoRA / LoRA+", best_trick),
    ]:
        diffs = paired(score, tasks, "dynamic", baseline, seeds) if baseline else None
        if diffs is None:
            why = (
                "none of them is in this plan yet"
                if label.startswith("best") and not tricks
                else "not every run has finished"
            )
            rows.append(f"- Dynamic LoRA ≥ {label} + {TARGETS[label]:.1f}: — ({why})")
            continue
        mean = statistics.mean(statistics.mean(d) for d in diffs.values())
        low, high = interval(diffs, "dynamic", baseline)
        chart[baseline] = (mean, low, high)
        name = f"{label} ({baseline})" if label.startswith("best") else label
        rows.append(
            f"- Dynamic LoRA ≥ {name} + {TARGETS[label]:.1f}: {mean:+.2f} [{low:+.2f}, {high:+.2f}] → "
            + verdict(mean, low, TARGETS[label])
        )
    for baseline in BASELINES:  # the rest of the comparisons, for the chart
        diffs = paired(score, tasks, "dynamic", baseline, seeds)
        if baseline not in chart and diffs is not None:
            mean = statistics.mean(statistics.mean(d) for d in diffs.values())
            chart[baseline] = (mean, *interval(diffs, "dynamic", baseline))
    return rows, chart


def best_of_tricks(score: dict, tasks: list[str], methods: list[str], seeds: list[int]) -> str | None:
    """The best of EVA / rsLoRA / LoRA+ on the average over ``tasks``, among those the table runs; None until every
    run of them has finished there."""
    tricks = [m for m in PEFT_TRICKS if m in methods]
    averages = {
        m: statistics.mean(statistics.mean(score[(t, m, s)] for s in seeds) for t in tasks)
        for m in tricks
        if all((t, m, s) in score for t in tasks for s in seeds)
    }
    return max(averages, key=averages.__getitem__) if tasks and averages and len(averages) == len(tricks) else None


def verdict(mean: float, low: float, target: float) -> str:
    """A target line is met when its whole 95 % interval is at or above the target: a mean above it that the
    interval does not back is not shown."""
    if low >= target:
        return f"**met** (the whole interval is at or above {target:+.1f})"
    if mean >= target:
        return f"**not met**: the mean is at or above {target:+.1f}, but the interval reaches below it"
    return f"**not met** (the mean is below {target:+.1f})"


def task_line(score: dict, task: str, row: str, refs, seeds: list[int], interval: Interval) -> str | None:
    """``- task: row − ref mean [low, high]; ...``: the row's mean paired difference on one task to each ref with
    every seed finished there, and its 95 % interval; None when no ref has."""
    parts = []
    for ref in refs:
        diffs = paired(score, [task], row, ref, seeds)
        if diffs is not None:
            low, high = interval(diffs, row, ref)
            parts.append(f"− {ref} {statistics.mean(diffs[task]):+.2f} [{low:+.2f}, {high:+.2f}]")
    return f"- {task}: {row} {'; '.join(parts)}" if parts else None


def per_task_lines(score: dict, tasks: list[str], seeds: list[int], interval: Interval) -> list[str]:
    """Per task, Dynamic LoRA's mean paired difference to each baseline with every seed finished there, and its
    95 % bootstrap interval: what the runs so far say before a whole table has finished."""
    lines = (task_line(score, task, "dynamic", BASELINES, seeds, interval) for task in tasks)
    return [line for line in lines if line]


def training_seconds(run: Path) -> float:
    """A run's training time from its log: the last elapsed time of each session (a resumed run starts a new
    one)."""
    total, last = 0.0, 0.0
    for record in read_log(run) if (run / "log.jsonl").is_file() else []:
        if "elapsed" in record:
            if record["elapsed"] < last:
                total += last
            last = record["elapsed"]
    return total + last


def last_epoch_gains(out: Path, tasks: list[str], methods: list[str], seeds: list[int]) -> list[str]:
    """Per task and method, how much the dev metric moved between the last two evaluations (an epoch apart in the
    encoder plans; mean over finished seeds): a run at its plateau moves by less than the seeds' spread."""
    lines = []
    for task in tasks:
        cells = []
        for method in methods:
            gains = []
            for seed in seeds:
                log = out / task / method / f"seed{seed}"
                if (log / "results.json").is_file():
                    evals = [100 * run_score(r["metrics"]) for r in read_log(log) if r.get("event") == "eval"]
                    if len(evals) >= 2:
                        gains.append(evals[-1] - evals[-2])
            if gains:
                cells.append(f"{method} {statistics.mean(gains):+.1f}")
        if cells:
            lines.append(f"- {task}: {', '.join(cells)}")
    return lines


def screening(score: dict, plan: dict, refs: tuple[str, ...]) -> list[str]:
    """The screening rows (per_method entries outside the plan's methods), each run on the seeds it finished,
    against ``refs`` (dynamic, lora, and the table's best PEFT baseline) on the same task and seed."""
    rows = []
    screens = [m for m in plan.get("per_method", {}) if m not in plan["methods"]]
    for (task, method, seed), value in sorted(score.items()):
        if method not in screens:
            continue
        against = [f"{value - score[(task, ref, seed)]:+.2f} vs {ref}" for ref in refs if (task, ref, seed) in score]
        rows.append(f"| {task} | {method} | {seed} | {value:.2f} | {'; '.join(against)} |")
    return rows


def screening_means(score: dict, plan: dict, interval: Interval, refs: tuple[str, ...]) -> list[str]:
    """Per task, each screening row that finished every seed of the plan: its mean paired difference to each of
    ``refs`` over those seeds, with the 95 % interval: what confirms or drops a candidate."""
    rows = [m for m in plan.get("per_method", {}) if m not in plan["methods"]]
    lines = (task_line(score, task, row, refs, plan["seeds"], interval) for task in plan["tasks"] for row in rows)
    return [line for line in lines if line]


def zero_shot(plan: dict, out: Path) -> float:
    """The untrained model's dev accuracy × 100 on the plan's task (`dynlora eval` without an adapter; the decoder
    table's task is scored by accuracy), measured once and kept in OUTPUT_DIR/zero_shot.json."""
    known = zero_shot_recorded(out)
    if known is not None:
        return known
    base = plan["base"]
    command = ["dynlora", "eval", "--model", base["model"], "--task", plan["tasks"][0]]
    command += ["--batch-size", str(base["batch_size"]), "--max-length", str(base["max_length"])]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    main_metric = float(re.search(r"validation: accuracy ([0-9.]+)", printed).group(1))
    (out / "zero_shot.json").write_text(json.dumps({"command": " ".join(command), "main": main_metric}) + "\n")
    return 100 * main_metric


def zero_shot_recorded(out: Path) -> float | None:
    path = out / "zero_shot.json"
    return 100 * json.loads(path.read_text())["main"] if path.is_file() else None


def curves(out: Path, tasks: list[str], methods: list[str], seeds: list[int]) -> Figure:
    """Dev main metric × 100 after each epoch, mean over the seeds that reached it, per task and method."""
    fig = Figure(figsize=(4 * len(tasks), 3.2))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=True):
        for method in methods:
            by_step: dict[int, list[float]] = {}
            for seed in seeds:
                log = out / task / method / f"seed{seed}"
                if (log / "log.jsonl").is_file():
                    for r in read_log(log):
                        if r.get("event") == "eval":
                            by_step.setdefault(r["step"], []).append(100 * run_score(r["metrics"]))
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], "o-", markersize=3, label=method)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=7)
        ax.set_ylabel("dev main metric × 100", fontsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


def interval_chart(chart: dict, over: str) -> Figure:
    fig = Figure(figsize=(6, 0.5 * len(chart) + 1.5))
    ax = fig.subplots()
    names = list(chart)
    means = [chart[n][0] for n in names]
    errors = [[chart[n][0] - chart[n][1] for n in names], [chart[n][2] - chart[n][0] for n in names]]
    ax.errorbar(means, range(len(names)), xerr=errors, fmt="o", capsize=3)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(names)), [f"dynamic − {n}" for n in names], fontsize=7)
    ax.set_xlabel(f"average paired difference, main metric × 100 (95 % bootstrap interval over {over})", fontsize=7)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(HERE / "glue_v2_plan.yaml"), help=f"one of {', '.join(TABLES)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1: leaves a core free)")
    parser.add_argument("--output-dir", help="run directories and results.jsonl (default: the plan's, TABLES)")
    parser.add_argument("--no-run", action="store_true", help="only write RESULTS.md from what has finished")
    args = parser.parse_args()
    plan_path = Path(args.plan).resolve()
    if plan_path.name not in TABLES:
        sys.exit(f"error: --plan must be one of {', '.join(TABLES)} in {HERE}, got {args.plan}")
    name, title, default_out = TABLES[plan_path.name]
    out = Path(args.output_dir or default_out)
    plan = yaml.safe_load(plan_path.read_text())
    command = f"dynlora compare --config {plan_path.relative_to(HERE.parent)} --jobs {args.jobs} --output-dir {out}"
    if not args.no_run:
        run_timed(command.split()[1:], out)
    # The untrained model's score, the floor of a decoder table: measured once (~2 min), even with --no-run.
    floor = zero_shot(plan, out) if plan["base"].get("objective") == "instruct" else None

    results = read_results(out / "results.jsonl")
    if not results:
        sys.exit(f"error: no finished runs in {out}/results.jsonl yet; run without --no-run first")
    (HERE / "results").mkdir(exist_ok=True)
    shutil.copyfile(out / "results.jsonl", HERE / "results" / f"{name}.jsonl")
    write_report(out)
    if (out / "final_ranks.png").is_file():
        shutil.copyfile(out / "final_ranks.png", HERE / "results" / f"{name}_final_ranks.png")
    tasks, methods, seeds = plan["tasks"], plan["methods"], plan["seeds"]
    done = [t for t in tasks if any(r["task"] == t for r in results)]
    curves(out, done, methods, seeds).savefig(HERE / "results" / f"{name}_curves.png", dpi=110)
    score = scores(results)
    complete = [t for t in tasks if all((t, m, s) in score for m in methods for s in seeds)]
    interval = Resampled(out, plan, score)
    over = "dev examples" if len(seeds) == 1 else "seeds and dev examples"
    lines, chart = (
        margin_lines(score, complete, methods, seeds, interval)
        if complete
        else (["- no task has finished every run"], {})
    )
    if chart:
        interval_chart(chart, over).savefig(HERE / "results" / f"{name}_differences.png", dpi=110)
    walls = (
        [json.loads(x) for x in (out / "wall_time.jsonl").read_text().splitlines()]
        if (out / "wall_time.jsonl").is_file()
        else []
    )
    hours = sum(w["seconds"] for w in walls) / 3600
    # Runs started outside this script (the screening rows, `dynlora compare` by hand) have no wall-time record:
    # their own logs say how long each trained.
    run_hours = sum(training_seconds(out / r["task"] / r["method"] / f"seed{r['seed']}") for r in results) / 3600
    expected = len(tasks) * len(methods) * len(seeds)
    finished = sum((t, m, s) in score for t in tasks for m in methods for s in seeds)  # screening rows not counted
    status = "complete" if finished == expected else f"**partial**: {finished} of {expected} runs"
    import peft
    import torch
    import transformers

    gains = last_epoch_gains(out, done, methods, seeds)
    floor_line = f"\nUntrained model, zero-shot (the floor): **{floor:.2f}**.\n" if floor is not None else ""
    body = f"""## {title}; {status})

`python benchmarks/glue_v2.py --plan benchmarks/{plan_path.name} --jobs {args.jobs}` (= `{command}`) — protocol
in [README.md](README.md) ("Protocol v2"), plan in [{plan_path.name}]({plan_path.name}). Updated
{date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} cores, CPU only; python
{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, peft
{peft.__version__}. Wall time of this script's invocations: {hours:.2f} h; training
time of the finished runs (their logs, screening included): {run_hours:.2f} h.

Final model's dev main metric × 100, mean ± std over seeds (n = seeds finished); the average only for methods
that finished every task of the table. params: trainable parameters (PEFT AdaLoRA's is its starting size; EVA
redistributes ranks, so its count differs a little on layers of different sizes).

{summary_table(results, done, methods)}
{floor_line}
Targets, on the average over the tasks where every run has finished ({", ".join(complete) or "none yet"}): {
        "the difference of the one seed's runs and its 95 % bootstrap interval over the dev examples (the same "
        "resampled examples for both runs). One seed: the interval says how much the dev set's sampling moves the "
        "difference, not how much another seed would"
        if len(seeds) == 1
        else "the mean paired difference (paired by seed) and its 95 % bootstrap interval, resampling both the "
        "seeds and the dev examples (the same examples for every run). It counts how far another seed and another "
        "dev sample would move the difference; with 3 seeds it is still rough"
    }. A line is met when its whole interval is at or above the target.

{chr(10).join(lines)}

Per task so far, Dynamic LoRA − each baseline with all {len(seeds)} seed(s) finished there (95 % interval over
{over}):

{chr(10).join(per_task_lines(score, done, seeds, interval)) or "- none yet"}

Dev curves (mean over seeds): ![curves](results/{name}_curves.png)

Change between the last two evaluations (an epoch apart in the encoder tables, 50 steps in the decoder's; mean
over seeds, points × 100): a run at its plateau moves less than the seeds' spread (or, with one seed, than the
dev set's sampling error); a larger gain means the run was still learning when it stopped.

{chr(10).join(gains) or "- none finished yet"}

{f"Paired differences: ![differences](results/{name}_differences.png)" if chart else ""}

Final rank allocation of the `dynamic` runs (mean over seeds): ![final ranks](results/{name}_final_ranks.png)

Raw per-run results: [results/{name}.jsonl](results/{name}.jsonl)."""
    write_section(HERE / "RESULTS.md", name, body)
    print(body)
    best = best_of_tricks(score, complete, methods, seeds)
    refs = ("dynamic", "lora", *([best] if best else []))
    screened = screening(score, plan, refs)
    if screened:
        screen_body = f"""## {title.split(" (")[0]}: screening candidate changes to Dynamic LoRA (one seed first)

Rows of [{plan_path.name}]({plan_path.name})'s `per_method` outside the main methods, run on one seed first as the
issue asks (`dynlora compare --config benchmarks/{plan_path.name} --seeds 0 --methods ...`, same output directory).
One seed decides nothing: a row that looks better is confirmed on every seed before it becomes a default. Final
model's dev main metric × 100, and its difference to {", ".join(f"`{r}`" for r in refs)} on the same seed (same
data order, same head init). {SCREEN_NOTES.get(name, "")}

| task | row | seed | score | difference |
|---|---|---|---|---|
{chr(10).join(screened)}

Rows with all {len(seeds)} seed(s): the mean paired difference and its 95 % interval ({over} resampled, as in the
table above):

{chr(10).join(screening_means(score, plan, interval, refs)) or "- none yet"}
"""
        write_section(HERE / "RESULTS.md", f"{name}_screen", screen_body)
        print(screen_body)


if __name__ == "__main__":
    main()
