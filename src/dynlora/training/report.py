"""``dynlora report DIR``: PNG plots and a markdown summary of a training run or of a comparison.

A run directory (``log.jsonl``): learning curves, the rank allocation as a layer × step heat-map, importance
curves. A comparison directory (``results.jsonl``): the mean ± std table, grouped bars per task, and the final rank
allocation of the dynamic runs (layer × task, averaged over seeds).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure  # figures without pyplot: the caller's matplotlib backend is left alone

from .compare import RESULTS, read_results, seed_stats, summary_table
from .metrics import format_metrics, run_score
from .run_dir import in_use
from .run_log import read_log


def _short(name: str) -> str:
    """bert.encoder.layer.3.attention.self.value -> L3.value"""
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"L{digits[0]}.{parts[-1]}" if digits else name


def _block_and_kind(name: str) -> tuple[int, str] | None:
    """bert.encoder.layer.3.attention.self.value -> (3, "attention.self.value"); None without a block index."""
    parts = name.split(".")
    i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
    return None if i is None or i == len(parts) - 1 else (int(parts[i]), ".".join(parts[i + 1 :]))


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path.name


def _cells(ax, matrix: list[list[float]], rows: list[str], cols: list[str], size: int, rotation: int, **image):
    """``matrix`` as coloured cells with their values written in (NaN cells left blank); the image, for a
    colour bar."""
    shown = ax.imshow(matrix, aspect="auto", cmap="viridis", **image)
    ax.set_yticks(range(len(rows)), rows, fontsize=size)
    ax.set_xticks(range(len(cols)), cols, fontsize=size, rotation=rotation)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value == value:  # not nan
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=size - 1, color="white")
    return shown


def _heatmap(
    matrix: list[list[float]], rows: list[str], cols: list[str], title: str, label: str, path: Path, xlabel: str = ""
) -> str:
    fig, ax = _figure(max(4.0, 0.45 * len(cols) + 2.5), max(3.0, 0.28 * len(rows) + 1.5))
    image = _cells(ax, matrix, rows, cols, 7, 90 if len(cols) > 8 else 0)
    fig.colorbar(image, ax=ax, label=label)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(title, fontsize=9)  # the figure is as narrow as its columns: a long title must still fit
    return _save(fig, path)


def report_run(run: Path) -> Path:
    records = read_log(run)
    start = next((r for r in records if r.get("event") == "start"), {})
    metric = f"dev {start.get('main_metric', 'main metric')}"
    images = []
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], run_score(r["metrics"])) for r in records if r.get("event") == "eval"]
    if losses:
        fig, ax = _figure(6, 3.5)
        lines = ax.plot(*zip(*losses, strict=True), label="training loss", color="tab:blue")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        if evals:
            twin = ax.twinx()
            lines += twin.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label=metric)
            twin.set_ylabel(metric)
        ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
        ax.set_title("learning curves")
        images.append(("Learning curves", _save(fig, run / "learning_curves.png")))
    allocations = [r for r in records if r.get("event") == "allocation"]
    if allocations:
        layers = list(allocations[-1]["ranks"])
        columns = ([{"step": "start", "ranks": start["ranks"]}] if start.get("ranks") else []) + allocations
        matrix = [[c["ranks"][n] for c in columns] for n in layers]
        steps = [str(c["step"]) for c in columns]
        path = run / "rank_allocation.png"
        heatmap = _heatmap(matrix, [_short(n) for n in layers], steps, "rank per layer", "rank", path, "step")
        images.append(("Rank allocation (layer × re-allocation step; the first column is the start)", heatmap))
        fig, ax = _figure(6.5, 4)
        ax.set_prop_cycle(color=matplotlib.colormaps["tab20"].colors)  # 20 distinct colours: one per layer up to 20
        for name in layers:
            scores = [max(a["scores"][name], 1e-30) for a in allocations]
            ax.plot([a["step"] for a in allocations], scores, label=_short(name), linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("importance score")
        ax.set_title("layer importance at each re-allocation")
        ax.legend(fontsize=6, ncol=2)
        images.append(("Importance", _save(fig, run / "importance.png")))
    lines = [f"# Run report: {run}", "", *_run_summary(run, records, metric), ""]
    lines += [f"## {title}\n\n![{title}]({name})\n" for title, name in images]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    return out


def _run_summary(run: Path, records: list[dict], metric: str) -> list[str]:
    results = run / "results.json"
    if not results.is_file():
        last = max((r.get("step", 0) for r in records), default=0)
        if in_use(run):
            return [f"- running: at step {last} when this report was written"]
        return [
            f"- stopped at step {last} before it finished (interrupted, killed or failed); "
            + (f"`dynlora train --output-dir {run} --resume` continues it" if (run / "checkpoints").is_dir() else "")
        ]
    result = json.loads(results.read_text())
    params, peak = result["trainable_parameters"], result.get("peak_trainable_parameters", 0)
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    started_above = config.get("method") == "dynamic" and config.get("adapter", {}).get("start_ratio", 1) > 1
    pruned = f", pruned from {peak:,}" if started_above else ""
    lines = [
        f"- method: `{result['method']}`, task: `{result['task']}`, seed {result['seed']}, "
        f"{result['steps']} steps, {params:,} trainable parameters{pruned}"
    ]
    lines += [f"- final {split}: {format_metrics(metrics)}" for split, metrics in result["metrics"].items()]
    if result.get("best"):
        lines.append(f"- best evaluation: step {result['best']['step']}, {metric} {result['best']['score']:.4f}")
    return lines


def report_comparison(root: Path) -> Path:
    results = read_results(root / RESULTS)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    lines = [f"# Comparison report: {root}", "", summary_table(results, tasks, methods), ""]

    fig, ax = _figure(max(5.0, 1.6 * len(tasks) + 2), 3.8)
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        # A task the method has not finished gets no bar (NaN), not a bar at 0 that reads as a score.
        stats = [seed_stats(results, task, method) or (float("nan"), 0.0, 0) for task in tasks]
        means, stds = [st[0] for st in stats], [st[1] for st in stats]
        ax.bar([i + j * width for i in range(len(tasks))], means, width, yerr=stds, capsize=2, label=method)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("main metric × 100 (mean ± std over seeds)")
    ax.legend(fontsize=7)
    ax.set_title("methods side by side")
    lines.append(f"## Scores\n\n![scores]({_save(fig, root / 'comparison.png')})\n")

    dynamic = [r for r in results if r["method"] == "dynamic" and r.get("ranks")]
    if dynamic:
        layers = list(dynamic[0]["ranks"])
        dyn_tasks = list(dict.fromkeys(r["task"] for r in dynamic))
        means = {
            t: {n: statistics.mean(r["ranks"][n] for r in dynamic if r["task"] == t) for n in layers} for t in dyn_tasks
        }
        name = _final_ranks(means, root / "final_ranks.png")
        lines.append(f"## Final rank allocation of the dynamic runs\n\n![final ranks]({name})\n")
    out = root / "report.md"
    out.write_text("\n".join(lines))
    return out


def rank_grid(ranks: dict[str, float]) -> tuple[list[int], list[str], list[list[float]]] | None:
    """Layer name -> rank as (blocks, module kinds, grid[block][kind]; NaN where a block lacks a kind), or None
    when a name has no block index or two names share a cell."""
    cells = [_block_and_kind(n) for n in ranks]
    if None in cells or len(set(cells)) < len(cells):
        return None
    blocks = sorted({b for b, _ in cells})
    kinds = list(dict.fromkeys(k for _, k in cells))
    grid = [[float("nan")] * len(kinds) for _ in blocks]
    for value, (block, kind) in zip(ranks.values(), cells, strict=True):
        grid[blocks.index(block)][kinds.index(kind)] = value
    return blocks, kinds, grid


def _final_ranks(means: dict[str, dict[str, float]], path: Path) -> str:
    """Mean final rank per layer, per task: a block × module grid per task when the layer names allow one
    (30 blocks × 7 projections read at a glance, where one column of 210 rows does not), else layer × task."""
    title = "final ranks, dynamic runs (mean over seeds)"
    grids = {task: rank_grid(ranks) for task, ranks in means.items()}
    if None in grids.values():
        layers = list(next(iter(means.values())))
        matrix = [[means[t][n] for t in means] for n in layers]
        return _heatmap(matrix, [_short(n) for n in layers], list(means), title, "rank", path)
    blocks, kinds, _ = next(iter(grids.values()))
    fig = Figure(figsize=(max(4.0, (0.5 * len(kinds) + 1.2) * len(means) + 1.2), max(3.0, 0.22 * len(blocks) + 1.8)))
    axes = fig.subplots(1, len(means), squeeze=False)[0]
    top = max(v for ranks in means.values() for v in ranks.values())
    for ax, (task, (blocks, kinds, grid)) in zip(axes, grids.items(), strict=True):
        image = _cells(ax, grid, [str(b) for b in blocks], _unique_suffixes(kinds), 6, 90, vmin=0, vmax=top)
        ax.set_title(task, fontsize=8)
        ax.set_ylabel("block", fontsize=7)
    fig.colorbar(image, ax=list(axes), label="rank")
    fig.suptitle(title, fontsize=9, y=1.02)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path.name


def _unique_suffixes(names: list[str]) -> list[str]:
    """The shortest dotted ending of each name that no other name shares: q_proj, attention.output.dense."""

    def ending(name: str, k: int) -> str:
        return ".".join(name.split(".")[-k:])

    out = []
    for name in names:
        k = 1
        while k < name.count(".") + 1 and [ending(n, k) for n in names].count(ending(name, k)) > 1:
            k += 1
        out.append(ending(name, k))
    return out


def write_report(directory: str | Path) -> Path:
    """Write plots and ``report.md`` into ``directory`` (a run or a comparison); returns the markdown path."""
    root = Path(directory)
    if (root / RESULTS).is_file():
        return report_comparison(root)
    if (root / "log.jsonl").is_file():
        return report_run(root)
    raise FileNotFoundError(f"{root} is neither a run directory (log.jsonl) nor a comparison ({RESULTS})")
