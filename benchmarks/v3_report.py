"""Protocol v3's report: every figure and interval of RESULTS.md's v3 section, recomputed from committed files.

    python benchmarks/v3_report.py            # from benchmarks/results/v3 only: no run directory is read
    python benchmarks/v3_report.py --floors   # first measure the untrained model's floors (once; needs the model)

Reads each table's ``runs.jsonl`` (every run's held-out curve and record) and the per-example predictions of its
scored runs (``<run>/seed<k>.predictions.jsonl``), and writes the v3 section of RESULTS.md with its plots. A score
is a ratio of sums over the reported set's units: SST-2's dev examples (correct answers / examples, × 100) or the
code corpus's test documents (−loss summed over their tokens / tokens: minus the mean loss per token, in nats). An
interval resamples both the seeds and the units (the same units for every run of a table) in each of ROUNDS
bootstrap rounds, so it counts what another seed and another test sample would each move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import yaml
from common import write_section
from matplotlib.figure import Figure
from v3 import (
    PREDICTIONS,
    at_rank,
    chosen_lr,
    latest,
    lr_grid,
    metric,
    name_parts,
    of_table,
    row_candidate,
    row_seeds,
    screen_of,
    variant,
)

from dynlora.training.compare import read_results

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "v3"
RECORDS = ("runs.jsonl", "screen.jsonl")  # a table's run records: its own runs, and issue 34's screen
ROUNDS = 2000
NAMES = {
    "dynamic": "Dynamic LoRA",
    "lora": "static LoRA",
    "peft-adalora": "PEFT AdaLoRA",
    "peft-rslora": "PEFT rsLoRA",
    "full": "full fine-tuning (every weight: the ceiling)",
}
# A table's score by what it trains for: answers right (a classifier's or an instruction's), or a language model's loss
FRONTIER_PLOT = """![frontier](results/v3/frontier.png)

Left: each method's test score, its interval the test documents' spread (wide: documents differ more than methods
do). Right: the paired differences the lines above read, their intervals resampling seeds and documents."""
UNITS = {"accuracy": ("accuracy, %", "dev examples"), "loss": ("−loss per token, nats", "test documents")}


def units(kind: str, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) per unit of the reported set: its score is their sums' ratio."""
    if kind == "accuracy":
        correct = np.array([100.0 * (r["prediction"] == r["label"]) for r in rows])
        return correct, np.ones(len(rows))
    documents = sorted({r["document"] for r in rows})
    loss, tokens = np.zeros(len(documents)), np.zeros(len(documents))
    where = {d: i for i, d in enumerate(documents)}
    for r in rows:
        loss[where[r["document"]]] += r["loss_sum"]
        tokens[where[r["document"]]] += r["tokens"]
    return -loss, tokens


class Table:
    """A table's scored runs: (run name, seed) -> per-unit (numerator, denominator), and the bootstrap draws."""

    def __init__(self, name: str, plan: dict, root: Path = RESULTS) -> None:
        self.name, self.plan, self.metric = name, plan, metric(plan, name)
        self.seed_list, self.methods = of_table(plan, name, "seeds"), of_table(plan, name, "methods")
        # What Dynamic LoRA is judged against: every method but itself and full fine-tuning (the ceiling)
        self.baselines = [m for m in self.methods if m not in ("dynamic", "full")]
        # How its scores print: accuracy in points (x 100, 2 decimals), a loss in nats per token (4 decimals).
        self.digits, self.scale = (2, 100.0) if self.metric == "accuracy" else (4, 1.0)
        self.runs, self.screen = (latest(read_results(root / name / f)) for f in RECORDS)
        self.scored: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        for path in sorted((root / name).glob(f"*/seed*{PREDICTIONS}")):
            seed = int(path.name.removesuffix(PREDICTIONS).removeprefix("seed"))
            self.scored[(path.parent.name, seed)] = units(self.metric, read_results(path))
        sizes = {len(num) for num, _ in self.scored.values()}
        if len(sizes) > 1:
            sys.exit(f"error: the scored runs of {name} cover different numbers of units: {sorted(sizes)}")
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        n = sizes.pop() if sizes else 0
        # per round, how often each unit was drawn: a weight per unit
        self.weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(ROUNDS)]) if n else None

    def score(self, run: str, seed: int) -> float:
        num, den = self.scored[(run, seed)]
        return float(num.sum() / den.sum())

    def resampled(self, run: str, seed: int) -> np.ndarray:
        num, den = self.scored[(run, seed)]
        return (self.weights @ num) / (self.weights @ den)

    def seeds(self, *runs: str) -> list[int]:
        """The seeds every one of ``runs`` was scored on."""
        return sorted(set.intersection(*({s for r, s in self.scored if r == run} for run in runs)))

    def interval(self, a: str, b: str) -> tuple[float, float, float, int] | None:
        """Mean over seeds of score(a) − score(b), paired by seed, and its 95 % interval (seeds and units
        resampled); None when no seed has both."""
        seeds = self.seeds(a, b)
        if not seeds:
            return None
        per_seed = np.stack([self.resampled(a, s) - self.resampled(b, s) for s in seeds], 1)  # [rounds, seeds]
        # The seeds' draws, the pair's own: an interval does not move with the lines printed before it.
        drawn = np.random.default_rng(zlib.crc32(f"{a} {b}".encode())).integers(0, len(seeds), (ROUNDS, len(seeds)))
        low, high = np.percentile(np.take_along_axis(per_seed, drawn, 1).mean(1), [2.5, 97.5])
        mean = statistics.mean(self.score(a, s) - self.score(b, s) for s in seeds)
        return mean, float(low), float(high), len(seeds)

    def adopted(self) -> str | None:
        """The rank-8 run of the screen candidate adopted as Dynamic LoRA's default (the plan's ``screen.adopted``),
        once scored on this table; None before."""
        name = self.plan.get("screen", {}).get("adopted")
        runs = {r for r, _ in self.scored if name and r.startswith(f"screen-{name}-lr") and name_parts(r)[2] is None}
        return min(runs) if runs else None

    def dynamic(self) -> tuple[str | None, str]:
        """Dynamic LoRA's run for the verdicts, and a note saying which it is: the adopted default's once scored on
        this table, else the table's own ``dynamic`` run."""
        name = self.plan.get("screen", {}).get("adopted")
        if not name:
            return self.chosen("dynamic"), ""
        if row_candidate(self.plan, self.name) == name:  # begun after the adoption: its own row
            return self.chosen("dynamic"), f"Dynamic LoRA here is its default since issue 34: {name} (its own row)."
        adopted = self.adopted()
        if adopted:
            return adopted, f"Dynamic LoRA here is its default since issue 34: {name} (the screen below)."
        return self.chosen("dynamic"), (
            f"Dynamic LoRA here is the table's Dynamic LoRA row ({self.row_ran()}): its default since issue 34, "
            f"{name}, is not scored on this table yet."
        )

    def row_ran(self) -> str:
        """What the table's own ``dynamic`` row ran: a named screen candidate, or the plan's base settings."""
        return row_candidate(self.plan, self.name) or "the plan's base"

    def progress(self) -> tuple[int, int]:
        """(finished, planned) runs of the table's rows: each method's grid on the selection seed, then its row's
        other seeds at its chosen lr (at the plan's rank)."""
        first, rank = self.plan["selection_seed"], self.plan["base"]["adapter"]["rank"]
        ran = {(r["variant"], r["seed"]) for r in self.runs if r["rank"] == rank}
        done = planned = 0
        for method in self.methods:
            grid, seeds = lr_grid(self.plan, method), [s for s in row_seeds(self.plan, self.name, method) if s != first]
            planned += len(grid) + len(seeds)
            done += sum((variant(method, lr), first) in ran for lr in grid)
            chosen = self.chosen(method)
            done += sum((chosen, s) in ran for s in seeds) if chosen else 0
        return done, planned

    def chosen(self, method: str) -> str | None:
        """The run name (method and lr) chosen for ``method`` on the held-out slice; None until its grid is done."""
        lr = chosen_lr(self.plan, self.runs, method)
        return None if lr is None else variant(method, lr)


def fmt(x: tuple[float, float, float, int] | None, digits: int) -> str:
    if x is None:
        return "—"
    mean, low, high, n = x
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] (n={n})"


def verdict(x: tuple[float, float, float, int] | None, planned_seeds: int, margin: float = 0.0) -> str:
    """Met when the whole interval is at or above ``margin``."""
    if x is None:
        return "— (not run yet)"
    partial = "" if x[3] >= planned_seeds else f", **partial**: {x[3]} of {planned_seeds} seeds"
    met = "**met**" if x[1] >= margin else "**not met**"
    return f"{met}{partial}"


def selection_lines(table: Table) -> list[str]:
    """Per method: its held-out best score at each lr of the grid (seed 0), the chosen lr, and each run's flag
    when its best held-out evaluation was its last (still rising when it stopped)."""
    digits, scale = table.digits, table.scale
    lines = [
        "| method | " + " | ".join(f"lr {lr:.1e}" for lr in table.plan["lr_grid"]) + " | chosen |",
        "|---|" + "---|" * (len(table.plan["lr_grid"]) + 1),
    ]
    first, rank = table.plan["selection_seed"], table.plan["base"]["adapter"]["rank"]
    for method in table.methods:
        cells = []
        own = lr_grid(table.plan, method) != table.plan["lr_grid"]  # a grid of its own: each cell says its lr
        for lr in lr_grid(table.plan, method):
            run = next(
                (r for r in table.runs if (r["method"], r["lr"], r["seed"], r["rank"]) == (method, lr, first, rank)),
                None,
            )
            if run is None:
                cells.append("—")
            elif "best" not in run:
                cells.append("diverged")
            else:
                rising = (
                    " ↑" if run["curve"] and max(run["curve"], key=lambda c: c[1])[0] == run["curve"][-1][0] else ""
                )
                cells.append(f"{scale * run['best']['score']:.{digits}f} @{run['best']['step']}{rising}")
            cells[-1] += f" (lr {lr:.1e})" if own else ""
        chosen = table.chosen(method)
        lines.append(f"| {NAMES[method]} | " + " | ".join(cells) + f" | {name_parts(chosen)[1] if chosen else '—'} |")
    return lines


def score_table(table: Table) -> list[str]:
    digits = table.digits
    lines = ["| method | lr | trainable parameters | score (mean ± std over seeds) |", "|---|---|---|---|"]
    adopted = table.adopted()
    before = f"Dynamic LoRA ({table.row_ran()})"
    rows = [(before if adopted and m == "dynamic" else NAMES[m], table.chosen(m)) for m in table.methods]
    if adopted:
        after = f"Dynamic LoRA, its default since issue 34 ({table.plan['screen']['adopted']})"
        rows.insert(table.methods.index("dynamic") + 1, (after, adopted))
    for name, run in rows:
        seeds = table.seeds(run) if run else []
        if not seeds:
            lines.append(f"| {name} | — | — | — |")
            continue
        values = [table.score(run, s) for s in seeds]
        counts = {
            (r["trainable_parameters"], r.get("peak_trainable_parameters", 0))
            for r in table.runs + table.screen
            if r["variant"] == run and "best" in r
        }
        params = [f"{final:,}" + (f" (peak {peak:,})" if peak > final else "") for final, peak in sorted(counts)]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {name} | {name_parts(run)[1]} | {', '.join(params)} | "
            f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f} (n={len(seeds)}) |"
        )
    return lines


def target_lines(table: Table) -> list[str]:
    """Dynamic LoRA against each baseline at its own chosen lr, and the target: ≥ the best baseline, or the table's
    own (``target``: ``over`` a named baseline by ``margin`` points); full fine-tuning is the ceiling, not a
    baseline."""
    digits = table.digits
    dynamic, note = table.dynamic()
    means = {}
    lines = []
    for method in table.baselines:
        run = table.chosen(method)
        x = table.interval(dynamic, run) if dynamic and run else None
        lines.append(f"- Dynamic LoRA − {NAMES[method]}: {fmt(x, digits)}")
        if run and table.seeds(run):
            means[method] = statistics.mean(table.score(run, s) for s in table.seeds(run))
    target = table.plan["tables"][table.name].get("target", {})
    best = max(means, key=means.__getitem__) if len(means) == len(table.baselines) else None
    best = target.get("over", best)
    x = table.interval(dynamic, table.chosen(best)) if best and dynamic and table.chosen(best) else None
    name = NAMES[best] if best else "the best baseline"
    margin = target.get("margin", 0.0)
    name += f" + {margin:g}" if margin else ""
    judged = verdict(x, len(table.seed_list), margin)  # in the units it prints, as the interval
    head = f"- **Target: Dynamic LoRA ≥ {name}**: {fmt(x, digits)} → {judged}"
    if "full" in table.methods:
        ceiling = table.chosen("full")
        gap = table.interval(ceiling, dynamic) if ceiling and dynamic else None
        lines.append(f"- {NAMES['full']} − Dynamic LoRA: {fmt(gap, digits)}")
    if ("untrained", 0) in table.scored and dynamic:  # how far training moved it from the untrained model
        lines.append(f"- Dynamic LoRA − the untrained model: {fmt(table.interval(dynamic, 'untrained'), digits)}")
    return ([note, ""] if note else []) + [head, *lines]


def frontier(plan: dict, table: Table) -> tuple[list[str], Figure | None]:
    """Dynamic LoRA at budget B against static LoRA at 2B, and the plot: score against parameters, and the paired
    differences the verdict reads (each method's own interval spans the documents' spread, which pairing removes)."""
    ranks = [*plan["frontier"]["ranks"], plan["base"]["adapter"]["rank"]]
    runs = {}
    for method in plan["frontier"]["methods"]:
        chosen = table.dynamic()[0] if method == "dynamic" else table.chosen(method)
        if chosen:
            for rank in ranks:
                runs[(method, rank)] = chosen if rank == plan["base"]["adapter"]["rank"] else at_rank(chosen, rank)
    digits = table.digits
    lines, met, doubled = [], [], []
    for rank in ranks:
        double = 2 * rank
        if ("dynamic", rank) in runs and ("lora", double) in runs:
            x = table.interval(runs[("dynamic", rank)], runs[("lora", double)])
            lines.append(f"- Dynamic LoRA at rank {rank} − static LoRA at rank {double}: {fmt(x, digits)}")
            met += [rank] if x is not None and x[1] >= 0 else []
            doubled += [(rank, x)] if x is not None else []
    if doubled:
        planned, fewest = len(table.seed_list), min(x[3] for _, x in doubled)
        whole = fewest >= planned and len(doubled) == sum(2 * rank in ranks for rank in ranks)
        where = f"**met** at rank {', '.join(map(str, met))}" if met else "**not met** at any rank"
        where += "" if whole or met else " run so far"
        where += f", **partial**: {fewest} of {planned} seeds" if fewest < planned else ""
        lines.insert(0, f"- Verdict: {where}")
    both = [rank for rank in ranks if ("dynamic", rank) in runs and ("lora", rank) in runs]
    pairs = [(rank, runs[("dynamic", rank)], runs[("lora", rank)]) for rank in both]
    same = [(rank, x) for rank, dynamic, lora in pairs if (x := table.interval(dynamic, lora)) is not None]
    if same:  # where re-allocation gains most: it should grow as the budget shrinks
        lines += ["", "At the same budget:", ""]
        lines += [f"- Dynamic LoRA − static LoRA at rank {rank}: {fmt(x, digits)}" for rank, x in same]
    doublings = [(r, 2 * r) for r in ranks if ("lora", r) in runs and ("lora", 2 * r) in runs]
    grown = [(r, d, x) for r, d in doublings if (x := table.interval(runs[("lora", d)], runs[("lora", r)])) is not None]
    if grown:  # the yardstick for both lists above: what a doubled budget buys without re-allocation
        lines += ["", "What doubling the rank buys static LoRA:", ""]
        lines += [f"- static LoRA at rank {d} − at rank {r}: {fmt(x, digits)}" for r, d, x in grown]
    if not any(table.seeds(r) for r in runs.values()):
        return lines, None
    fig = Figure(figsize=(10, 3.6))
    ax, paired = fig.subplots(1, 2)
    for method in plan["frontier"]["methods"]:
        points = []
        for rank in ranks:
            run = runs.get((method, rank))
            seeds = table.seeds(run) if run else []
            if seeds:
                params = next(
                    r["trainable_parameters"] for r in table.runs + table.screen if r["variant"] == run and "best" in r
                )
                resampled = np.mean([table.resampled(run, s) for s in seeds], 0)
                mean = statistics.mean(table.score(run, s) for s in seeds)
                points.append((params, mean, *np.percentile(resampled, [2.5, 97.5])))
        if points:
            p = np.array(points)
            ax.errorbar(p[:, 0], p[:, 1], yerr=[p[:, 1] - p[:, 2], p[:, 3] - p[:, 1]], fmt="o-", capsize=3,
                        label=NAMES[method])  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (ranks 1, 2, 4, 8 of all 210 projections)", fontsize=7)
    ax.set_ylabel(f"test {UNITS[table.metric][0]}", fontsize=7)
    ax.legend(fontsize=7)
    against = [("static LoRA at rank B", same, "tab:green"), ("static LoRA at rank 2B", doubled, "tab:red")]
    for offset, (label, points, color) in enumerate(against):
        if points:
            p = np.array([(rank * 1.04**offset, *x[:3]) for rank, x in points])  # side by side, not on top
            paired.errorbar(p[:, 0], p[:, 1], yerr=[p[:, 1] - p[:, 2], p[:, 3] - p[:, 1]], fmt="o", capsize=3,
                            color=color, label=f"Dynamic LoRA at rank B − {label}")  # fmt: skip
    paired.axhline(0, color="grey", linewidth=0.8)
    paired.set_xscale("log", base=2)
    paired.set_xticks(ranks, [str(rank) for rank in ranks])
    paired.set_xlabel("budget: rank B of all 210 projections", fontsize=7)
    paired.set_ylabel(f"paired difference, {UNITS[table.metric][0]} (95 % interval)", fontsize=7)
    if same or doubled:
        paired.legend(fontsize=7)
    for panel in (ax, paired):
        panel.tick_params(labelsize=7, which="both")
    fig.tight_layout()
    return lines, fig


def curves(table: Table) -> Figure:
    """Held-out score of every selection run (seed 0) against its step, one panel per method."""
    methods = table.methods
    fig = Figure(figsize=(3.2 * len(methods), 2.8))
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    scale = table.scale
    for ax, method in zip(axes, methods, strict=True):
        for r in table.runs:
            if r["method"] == method and r["seed"] == table.plan["selection_seed"] and r["curve"]:
                steps, values = zip(*r["curve"], strict=True)
                ax.plot(steps, [scale * v for v in values], "o-", markersize=3, label=f"lr {r['lr']:.1e}")
        ax.set_title(NAMES[method], fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.legend(fontsize=6)
    axes[0].set_ylabel(f"held-out {UNITS[table.metric][0]}", fontsize=7)
    fig.tight_layout()
    return fig


def screen_lines(table: Table) -> list[str]:
    """Issue 34's screen on one table (benchmarks/v3.py): each candidate's best held-out score and its difference
    from the score of what it is screened on (``default``, unless it names another as ``on_top_of``) at the same lr
    and rank (a candidate at a frontier rank: against that one's frontier run; one seed: a screen, not a verdict);
    then each confirmed candidate's paired intervals on the reported set against Dynamic LoRA and every baseline
    at their chosen lrs."""
    name, plan, runs = table.name, table.plan, table.screen
    if not runs:
        return []
    digits, scale = table.digits, table.scale
    screened = [r for r in runs if r["seed"] == plan["selection_seed"]]
    frontier = [r for r in table.runs if r["variant"].startswith("screen-") and r["seed"] == plan["selection_seed"]]
    scores = {
        (screen_of(r), r["lr"], name_parts(r["variant"])[2]): r["best"]["score"]
        for r in screened + frontier
        if "best" in r
    }
    changes = plan.get("screen", {}).get("candidates", {})
    lines = [
        "| candidate | changes | lr | trainable parameters (peak) | best held-out @ step "
        "| − what it is on, same lr and rank |",
        "|---|---|---|---|---|---|",
    ]
    for run in screened:
        candidate = screen_of(run)
        own = changes.get(candidate, {})
        on = own.get("on_top_of", "default")
        rank = name_parts(run["variant"])[2]
        change = ", ".join(
            f"{k}={v}" for k, v in {**({"rank": rank} if rank else {}), **own.get("adapter", {})}.items()
        )
        change = change or "—"
        change += f" (on {on})" if on != "default" else ""
        if "best" not in run:
            lines.append(f"| {candidate} | {change} | {run['lr']:.1e} | — | diverged | — |")
            continue
        peak = run.get("peak_trainable_parameters", run["trainable_parameters"])
        params = f"{run['trainable_parameters']:,}" + (f" ({peak:,})" if peak > run["trainable_parameters"] else "")
        score, base = run["best"]["score"], scores.get((on, run["lr"], rank))
        versus = "—" if base is None or candidate == "default" else f"{scale * (score - base):+.{digits}f}"
        lines.append(
            f"| {candidate} | {change} | {run['lr']:.1e} | {params} | "
            f"{scale * score:.{digits}f} @{run['best']['step']} | {versus} |"
        )
    confirmed = sorted({r["variant"] for r in runs if table.seeds(r["variant"])})
    if confirmed:
        lines += ["", "Confirmed on the reported set (paired, 95 % interval, seeds and units resampled):", ""]
    adopted = table.plan["screen"]["adopted"] if table.adopted() else None  # once scored, it stands for Dynamic LoRA
    references = [(f"{NAMES['dynamic']} ({adopted}, its default)" if adopted else NAMES["dynamic"], table.dynamic()[0])]
    if table.adopted():  # Dynamic LoRA is then the adopted default: the table's own row is the one it replaced
        references.append((f"the table's Dynamic LoRA row ({table.row_ran()})", table.chosen("dynamic")))
    references += [(NAMES[m], table.chosen(m)) for m in table.baselines]
    for run in confirmed:
        for name, other in references:
            if other != run:
                x = table.interval(run, other) if other else None
                lines.append(f"- {run.removeprefix('screen-')} − {name}: {fmt(x, digits)}")
    return lines


def floors(plan: dict) -> None:
    """The untrained model's floors, measured once into results/v3/<table>/floors.json (module doc)."""
    from v3_floors import measure  # loads the model: only when asked

    for name in plan["tables"]:
        path = RESULTS / name / "floors.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(measure(name, plan), indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(HERE / "v3_plan.yaml"))
    parser.add_argument("--floors", action="store_true", help="measure the untrained model's floors first")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where the committed records are")
    parser.add_argument("--no-write", action="store_true", help="print the section; write neither RESULTS.md nor plots")
    args = parser.parse_args()
    root = Path(args.results_dir)
    plan = yaml.safe_load(Path(args.plan).read_text())
    if args.floors:
        floors(plan)
    parts, targets = [], []  # the sections, and each one's target line with its verdict (the section opens with them)
    for name in plan["tables"]:
        table = Table(name, plan, root)
        if not args.no_write:
            curves(table).savefig(root / f"{name}_curves.png", dpi=110)
        unit, over = UNITS[table.metric]
        floor = root / name / "floors.json"
        floor_text = json.loads(floor.read_text())["summary"] if floor.is_file() else "not measured yet (--floors)"
        done, planned = table.progress()
        status = "complete" if done >= planned else f"**partial**: {done} of {planned} runs"
        paired = target_lines(table)
        head = next(line for line in paired if line.startswith("- **Target"))
        targets.append(f"- {name} ({unit}, {status}): {head.removeprefix('- ')}")
        parts.append(f"""### {name}: {unit}, scored on the {over} ({status})

Held-out selection (seed 0; best held-out score @ its step; ↑: the run's best evaluation was its last, still
rising when it stopped):

{chr(10).join(selection_lines(table))}

Reported set, each method at its chosen lr, its best held-out adapter:

{chr(10).join(score_table(table))}

Untrained model: {floor_text}.

Paired differences (95 % interval, seeds and {over} resampled):

{chr(10).join(paired)}

Held-out curves of the selection runs: ![curves](results/v3/{name}_curves.png)
""")
        screened = screen_lines(table)
        if screened:
            parts.append(f"""#### Issue 34's screen on {name} (seed 0, held-out slice; higher is better)

{chr(10).join(screened)}
""")
    table = Table(plan["frontier"]["table"], plan, root)
    lines, fig = frontier(plan, table)
    if fig is not None and not args.no_write:
        fig.savefig(root / "frontier.png", dpi=110)
    frontier_plan = plan["frontier"]
    planned = len(frontier_plan["ranks"]) * len(frontier_plan["methods"]) * len(table.seed_list)
    done = sum(r["rank"] in frontier_plan["ranks"] for r in table.runs)
    status = "complete" if done >= planned else f"{done} of {planned} runs"
    said = next((line.removeprefix("- Verdict: ") for line in lines if line.startswith("- Verdict")), "not run yet")
    targets.append(
        f"- the budget frontier ({frontier_plan['table']}, {status}): **Target: Dynamic LoRA at "
        f"budget B ≥ static LoRA at 2B for some B** → {said}"
    )
    parts.append(f"""### The budget frontier ({frontier_plan["table"]}; {status})

**Target: Dynamic LoRA at budget B ≥ static LoRA at 2B for some B**:

{chr(10).join(lines) or "- not run yet"}

{FRONTIER_PLOT if fig is not None else ""}
""")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    body = f"""## Protocol v3 (the current benchmark)

`python benchmarks/v3_report.py` (at {commit or "this checkout"}) recomputes everything below from
[results/v3/](results/v3/); protocol in [README.md](README.md) ("Protocol v3"), plan in
[v3_plan.yaml](v3_plan.yaml). Scores are × 100 for accuracy, and minus the mean loss per token (nats) for the
code corpus: higher is better in both.

### Target lines

Each is met only when its whole 95 % interval (seeds and reported units resampled) clears it; a line over fewer
seeds than planned says so.

{chr(10).join(targets)}

{chr(10).join(parts)}"""
    if not args.no_write:
        write_section(HERE / "RESULTS.md", "v3", body)
    print(body)


if __name__ == "__main__":
    main()
