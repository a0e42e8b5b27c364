"""The quality benchmark, protocol v3: run a table of v3_plan.yaml, and keep what every figure is computed from.

    python benchmarks/v3_data.py                       # the data, once (runs/v3-data)
    python benchmarks/v3.py run --table sst2           # lr selection, then the other seeds, then the scoring
    python benchmarks/v3.py run --table stdlib
    python benchmarks/v3.py run --table sst2 --only peft-rslora   # one method's row: its grid, then its seeds
    python benchmarks/v3.py run --frontier             # after the frontier's table has chosen its lrs
    python benchmarks/v3.py run --screen --table stdlib   # issue 34's candidates, after the table chose its lrs
    python benchmarks/v3.py run --screen --table sst2 --only no-input-norm   # one candidate of the screen

Resumable: a finished run is a line of RESULTS/<table>/runs.jsonl and is skipped; an interrupted one resumes from
its checkpoint; a chosen run whose directory is lost before it was scored is trained again (a new line). One run at
a time per invocation; start one per core (OMP_NUM_THREADS=1), on the same table or not: a run another invocation
is training is locked (OUTPUT/<table>/<run>/seed<k>.lock) and skipped.

For each method in turn, seed 0 runs at every lr of the grid; the lr whose run reached the best held-out score at
any of its evaluations is chosen, and the other seeds run at it. Each chosen run's best held-out adapter (``best/``) is
then scored once on the reported set by ``dynlora eval --predictions``. Kept under benchmarks/results/v3/<table>/
(committed): every run's held-out curve and record (``runs.jsonl``), and each scored run's per-example
predictions (``<run>/seed<k>.predictions.jsonl``): benchmarks/v3_report.py recomputes every figure from them.

The screen (issue 34) runs each candidate change to Dynamic LoRA on the selection seed, at Dynamic LoRA's chosen lr
unless the candidate names its own lrs (and at the plan's rank unless it names a frontier ``rank``), on the held-out
slice only (``<table>/screen.jsonl``); its ``default`` candidate is Dynamic LoRA as the plan's base sets it, from the
same code; a candidate is judged against it, or against the candidate it names as ``on_top_of`` (its settings then
add to that one's). The candidates the
plan lists under ``confirm`` (those that passed) go first: every seed at the best screened lr, each scored once on
the reported set.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from dynlora.training.checkpoint import latest_checkpoint
from dynlora.training.compare import append_result, read_results
from dynlora.training.errors import Diverged
from dynlora.training.fields import from_mapping, merge
from dynlora.training.loop import TrainingRun
from dynlora.training.metrics import run_score
from dynlora.training.run_log import read_log
from dynlora.training.settings import SETTINGS, TrainSettings

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "v3"
PREDICTIONS = ".predictions.jsonl"  # a scored run's per-example file: <table>/<run>/seed<k>.predictions.jsonl


def load_plan(path: Path) -> dict[str, Any]:
    plan = yaml.safe_load(path.read_text())
    plan["base"] = from_mapping(plan["base"], SETTINGS, f"{path.name}: base")
    for name, table in plan["tables"].items():
        table["train"] = from_mapping(table["train"], SETTINGS, f"{path.name}: tables.{name}.train")
    return plan


def variant(method: str, lr: float, rank: int | None = None) -> str:
    """A run's name in its table: the method, its lr and, on the frontier, its rank."""
    return f"{method}-lr{lr:.1e}" + (f"-r{rank}" if rank else "")


RUN_NAME = re.compile(r"(?P<stem>.+)-lr(?P<lr>\d\.\de[+-]\d+)(?:-r(?P<rank>\d+))?")


def name_parts(name: str) -> tuple[str, str, int | None]:
    """A run name's parts, as :func:`variant` wrote them: (method or ``screen-<candidate>``, lr as written, the
    frontier's rank or None)."""
    parts = RUN_NAME.fullmatch(name)
    if parts is None:
        raise ValueError(f"{name!r} is not a v3 run name (<method>-lr<lr>[-r<rank>])")
    return parts["stem"], parts["lr"], int(parts["rank"]) if parts["rank"] else None


def at_rank(name: str, rank: int) -> str:
    """The frontier run at ``rank`` of the rank-8 run ``name``."""
    stem, lr, _ = name_parts(name)
    return variant(stem, float(lr), rank)


def lr_grid(plan: dict, method: str) -> list[float]:
    """The lrs ``method`` is selected from: the plan's grid, unless ``lr_grids`` gives the method its own (full
    fine-tuning works an order of magnitude below the adapters)."""
    return plan.get("lr_grids", {}).get(method, plan["lr_grid"])


def metric(plan: dict, table: str) -> str:
    """What a table scores: ``loss`` for language modelling, else ``accuracy`` (a classifier's or an instruction's
    answers)."""
    return "loss" if plan["tables"][table]["train"].get("objective") == "lm" else "accuracy"


def of_table(plan: dict, table: str, key: str) -> list:
    """The table's ``seeds`` or ``methods``: its own if it names them, else the plan's."""
    return plan["tables"][table].get(key, plan[key])


def row_candidate(plan: dict, table: str) -> str | None:
    """The screen candidate a table's Dynamic LoRA row runs as (a table begun after an adoption), or None: the
    plan's base."""
    return plan["tables"][table].get("dynamic")


def row_seeds(plan: dict, table: str, method: str) -> list[int]:
    """The seeds ``method``'s row of ``table`` runs. A Dynamic LoRA row begun before its default's adoption keeps
    its selection seed only (its grid): the adopted default, confirmed on every seed by the screen, is the row
    judged, and the old default stays as the screen's reference."""
    seeds = of_table(plan, table, "seeds")
    adoption = plan.get("screen", {})
    superseded = (
        method == "dynamic"
        and adoption.get("adopted") in (adoption.get("confirm") or [])
        and row_candidate(plan, table) != adoption["adopted"]
    )
    return [plan["selection_seed"]] if superseded else seeds


def run_settings(
    plan: dict,
    table: str,
    method: str,
    lr: float,
    seed: int,
    out: Path,
    rank: int | None,
    candidate: tuple[str, dict] | None = None,
) -> dict:
    """One run's settings; ``candidate``: a screened change, (its name, the adapter settings it changes)."""
    settings = merge(plan["base"], plan["tables"][table]["train"])
    settings = {**settings, "method": method, "lr": lr, "seed": seed}
    if rank:
        settings["adapter"] = {**settings["adapter"], "rank": rank, "alpha": 2.0 * rank}
    name = variant(method, lr, rank)
    row = row_candidate(plan, table)
    if method == "dynamic" and candidate is None and row:
        settings["adapter"] = {**settings["adapter"], **candidate_change(plan["screen"]["candidates"], row)}
    if candidate:
        name = screened(candidate[0], lr, rank)
        settings["adapter"] = {**settings["adapter"], **candidate[1]}
    settings["task"] = settings.get("task", table)  # a language-model table is named by its table, not a GLUE task
    settings["output_dir"] = str(out / table / name / f"seed{seed}")
    TrainSettings.from_settings(settings)  # a wrong setting fails here, before hours of runs
    return settings


def candidate_change(candidates: dict, name: str) -> dict:
    """A screened candidate's adapter settings: those of the candidate it is screened on (``on_top_of``, if any),
    then its own."""
    candidate = candidates[name]
    on = candidate.get("on_top_of")
    if on is not None and on not in candidates:
        raise ValueError(f"screen candidate {name} is on {on!r}, which is not a candidate of the plan")
    return {**(candidate_change(candidates, on) if on else {}), **candidate.get("adapter", {})}


def screened(candidate: str, lr: float, rank: int | None = None) -> str:
    """A screened run's name: the candidate, its lr and, on the frontier, its rank."""
    return variant(f"screen-{candidate}", lr, rank)


def adopted(plan: dict) -> tuple[str, dict] | None:
    """The screen candidate adopted as ``--method dynamic``'s default (``screen.adopted``) and its adapter settings:
    the frontier's Dynamic LoRA runs with them."""
    name = plan.get("screen", {}).get("adopted")
    return (name, candidate_change(plan["screen"]["candidates"], name)) if name else None


def held_out_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out main score) of each evaluation of a run."""
    return [(r["step"], run_score(r["metrics"])) for r in read_log(run_dir) if r.get("event") == "eval"]


@contextmanager
def locked(run_dir: Path) -> Iterator[bool]:
    """Hold the run's lock while the block runs, or yield False if another invocation holds it (training or scoring
    that run)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def train_once(settings: dict, results: Path, name: str) -> dict:
    """Train one run unless ``results`` has it, or another process is training it (then skipped here: an empty
    record); returns its record (a diverged run's says so)."""
    run_dir = Path(settings["output_dir"])
    with locked(run_dir) as mine:
        if not mine:
            print(f"{name} seed {settings['seed']}: another process is training it, skipped", flush=True)
            return {}
        done = {(r["variant"], r["seed"]): r for r in read_results(results)}  # read under the lock
        if (name, settings["seed"]) in done:
            return done[(name, settings["seed"])]
        return train(settings, results, name, run_dir)


def train(settings: dict, results: Path, name: str, run_dir: Path) -> dict:
    """Train (or resume) one run and append its record to ``results``."""
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    print(f"{name} seed {settings['seed']}" + (" (resuming)" if resume else ""), flush=True)
    try:
        result = TrainingRun(TrainSettings.from_settings({**settings, "resume": resume, "progress": False})).run()
        record = {"best": result["best"], "trainable_parameters": result["trainable_parameters"]}
        if "peak_trainable_parameters" in result:  # an over-parameterised start is pruned while it trains
            record["peak_trainable_parameters"] = result["peak_trainable_parameters"]
        record["ranks"] = result["ranks"]
    except Diverged as e:
        record = {"diverged": str(e).splitlines()[0]}
    record = {
        "variant": name,
        "method": settings["method"],
        "lr": settings["lr"],
        "rank": settings["adapter"]["rank"],
        "seed": settings["seed"],
        "curve": held_out_curve(run_dir),
        **record,
    }
    append_result(results, record)
    return record


def latest(records: list[dict]) -> list[dict]:
    """Each run's last record: a run trained again after its directory was lost is appended anew."""
    return list({(r["variant"], r["seed"]): r for r in records}.values())


def chosen_lr(plan: dict, records: list[dict], method: str) -> float | None:
    """The grid lr whose selection run (the plan's rank, its selection seed) reached the best held-out score (a tie
    goes to the lr first in the grid, the smaller); None until every one has finished."""
    seed, rank = plan["selection_seed"], plan["base"]["adapter"]["rank"]
    grid = lr_grid(plan, method)
    runs = {r["lr"]: r for r in records if r["method"] == method and r["seed"] == seed and r["rank"] == rank}
    if not all(lr in runs for lr in grid):
        return None
    finished = {lr: r["best"]["score"] for lr, r in runs.items() if "best" in r}
    return max(finished, key=finished.__getitem__) if finished else None


def score(plan: dict, table: str, record: dict, settings: dict, results: Path) -> None:
    """Score a chosen run's best held-out adapter once on the reported set, into the committed predictions; not a
    run another invocation is training (its ``best/`` is not final). A run whose directory was lost before its
    adapter was scored is trained again first (its new record is the one read from then on; whether it reproduced
    the recorded held-out curve is printed)."""
    target = plan["results_dir"] / table / record["variant"] / f"seed{record['seed']}{PREDICTIONS}"
    if target.is_file():
        return
    run_dir, run = Path(settings["output_dir"]), f"{record['variant']} seed {record['seed']}"
    with locked(run_dir) as mine:  # not while another invocation trains it: its best/ is not final yet
        if not mine:
            print(f"{run}: another process is training it, not scored here", flush=True)
            return
        if target.is_file():  # scored by another invocation meanwhile
            return
        if not (run_dir / "best").is_dir():
            print(f"{run}: its adapter is gone unscored; training it again", flush=True)
            again = train(settings, results, record["variant"], run_dir)
            if "best" not in again:  # it diverged this time
                return
            was, now = ([list(point) for point in r["curve"]] for r in (record, again))
            print(f"{run}: held-out curve {'reproduced' if was == now else now}", flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        command = [sys.executable, "-m", "dynlora.cli", "eval", "--adapter", str(run_dir / "best")]
        model = merge(plan["base"], plan["tables"][table]["train"])["model"]
        command += ["--model", model, *plan["tables"][table]["report"], "--predictions", str(partial)]
        print(f"scoring {run} on the reported set", flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            sys.exit(f"error: scoring {run} failed: {why}")
        os.replace(partial, target)
        print(done.stdout.strip(), flush=True)


def run_table(plan: dict, table: str, out: Path, only: str | None = None) -> None:
    """Each method in turn: its lr grid on the selection seed, then its other seeds at the chosen lr, each run
    scored when it finishes (so that a run directory lost later costs no score, and a method's row is whole before
    the next method starts); ``only``: that method alone."""
    methods = of_table(plan, table, "methods")
    if only is not None and only not in methods:
        sys.exit(f"error: --only {only}: not a method of table {table} ({', '.join(methods)})")
    results = plan["results_dir"] / table / "runs.jsonl"
    results.parent.mkdir(parents=True, exist_ok=True)
    first = plan["selection_seed"]
    for method in [m for m in methods if only in (None, m)]:
        for lr in lr_grid(plan, method):
            train_once(run_settings(plan, table, method, lr, first, out, None), results, variant(method, lr))
        score_chosen(plan, table, method, out)
        lr = chosen_lr(plan, read_results(results), method)
        if lr is None:  # its grid is not whole (another invocation is training part of it)
            continue
        for seed in [s for s in row_seeds(plan, table, method) if s != first]:
            train_once(run_settings(plan, table, method, lr, seed, out, None), results, variant(method, lr))
            score_chosen(plan, table, method, out)


def score_chosen(plan: dict, table: str, method: str, out: Path) -> None:
    """Score every finished run of ``method`` at its chosen lr (at the plan's rank) that is not scored yet."""
    results = plan["results_dir"] / table / "runs.jsonl"
    records = read_results(results)
    lr = chosen_lr(plan, records, method)
    for record in latest(records):
        if lr is not None and "best" in record and record["variant"] == variant(method, lr):
            score(plan, table, record, run_settings(plan, table, method, lr, record["seed"], out, None), results)


def run_frontier(plan: dict, out: Path) -> None:
    """Every rank of the frontier on one seed, then on the next: the first seed's frontier is whole first. Dynamic
    LoRA runs as its adopted default sets it (:func:`adopted`) once the plan names one."""
    frontier = plan["frontier"]
    table = frontier["table"]
    results = plan["results_dir"] / table / "runs.jsonl"
    for seed in of_table(plan, table, "seeds"):
        for rank in frontier["ranks"]:
            for method in frontier["methods"]:
                lr = chosen_lr(plan, read_results(results), method)
                if lr is None:
                    sys.exit(f"error: {method} has no chosen lr on {table} yet: run --table {table} first")
                change = adopted(plan) if method == "dynamic" else None
                settings = run_settings(plan, table, method, lr, seed, out, rank, change)
                record = train_once(settings, results, Path(settings["output_dir"]).parent.name)
                if "best" in record:
                    score(plan, table, record, settings, results)


def run_screen(plan: dict, table: str, out: Path, only: str | None = None) -> None:
    """The candidates the plan lists under ``confirm`` first (their screen run, then every seed, scored on the
    reported set), then every other candidate of the screen in the plan's order, on the held-out slice only;
    ``only``: that candidate alone."""
    records = read_results(plan["results_dir"] / table / "runs.jsonl")
    chosen = chosen_lr(plan, records, "dynamic")
    if chosen is None:
        sys.exit(f"error: dynamic has no chosen lr on {table} yet: run --table {table} first")
    results = plan["results_dir"] / table / "screen.jsonl"
    candidates = plan["screen"]["candidates"]
    if only is not None and only not in candidates:
        sys.exit(f"error: --only {only}: not a screen candidate of the plan ({', '.join(candidates)})")
    confirm = [c for c in plan["screen"].get("confirm") or [] if only in (None, c)]

    def screen(name: str) -> None:
        rank = candidates[name].get("rank")  # a candidate at a frontier rank, judged against its frontier run
        for lr in candidates[name].get("lrs", [chosen]):
            change = (name, candidate_change(candidates, name))
            settings = run_settings(plan, table, "dynamic", lr, plan["selection_seed"], out, rank, change)
            train_once(settings, results, screened(name, lr, rank))

    for name in confirm:  # passed the screen: every seed at its best screened lr, scored on the reported set
        screen(name)
        finished = [r for r in read_results(results) if screen_of(r) == name and "best" in r]
        if not finished:
            print(f"{name}: no finished screen run on {table} to confirm", flush=True)
            continue
        lr = max(finished, key=lambda r: r["best"]["score"])["lr"]
        change = (name, candidate_change(candidates, name))
        for seed in of_table(plan, table, "seeds"):
            settings = run_settings(plan, table, "dynamic", lr, seed, out, None, change)
            record = train_once(settings, results, screened(name, lr))
            if "best" in record:
                score(plan, table, record, settings, results)
    for name in candidates:
        if name not in confirm and only in (None, name):
            screen(name)


def screen_of(record: dict) -> str:
    """The candidate a screen record ran."""
    return name_parts(record["variant"])[0].removeprefix("screen-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["run"])
    parser.add_argument("--table", help="a table of the plan")
    parser.add_argument("--frontier", action="store_true", help="the budget frontier (after its table)")
    parser.add_argument("--screen", action="store_true", help="issue 34's candidates on --table (after the table)")
    parser.add_argument("--only", help="with --screen: this candidate alone; else: this method of --table alone")
    parser.add_argument("--plan", default=str(HERE / "v3_plan.yaml"))
    parser.add_argument("--output-dir", default="runs/v3", help="run directories (not committed)")
    parser.add_argument("--results-dir", default=str(RESULTS), help="what is committed: records and predictions")
    args = parser.parse_args()
    plan = {**load_plan(Path(args.plan)), "results_dir": Path(args.results_dir)}
    out = Path(args.output_dir)
    if args.frontier:
        run_frontier(plan, out)
    elif args.screen and args.table in plan["tables"]:
        run_screen(plan, args.table, out, args.only)
    elif args.table in plan["tables"]:
        run_table(plan, args.table, out, args.only)
    else:
        sys.exit(f"error: give --table ({', '.join(plan['tables'])}) or --frontier")


if __name__ == "__main__":
    main()
