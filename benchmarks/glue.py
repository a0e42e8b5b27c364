"""The GLUE quality benchmark: every method × task × seed of benchmarks/glue_plan.yaml, then RESULTS.md.

    python benchmarks/glue.py [--jobs 2] [--output-dir runs/glue-benchmark] [--no-run]

Runs ``dynlora compare --config benchmarks/glue_plan.yaml`` (resumable: start the same command again after an
interruption and only what is missing runs), appends each invocation's wall time to OUTPUT_DIR/wall_time.jsonl,
then writes what has finished — complete or not — to the GLUE section of benchmarks/RESULTS.md: the quality table
(mean ± std over seeds), trainable parameters, the final rank allocation picture, versions, date and the total
wall time. ``--no-run`` only writes the section. Raw per-run results: benchmarks/results/glue.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml
from common import write_section

from dynlora.training.compare import read_results, seed_stats, summary_table
from dynlora.training.metrics import run_score
from dynlora.training.report import write_report

HERE = Path(__file__).resolve().parent
PLAN = HERE / "glue_plan.yaml"
# Rows kept as a record of an earlier design, run on these tasks only (glue_plan.yaml, README.md).
RECORD_ONLY = {"dynamic-randinit": ["cola", "stsb", "sst2"], "dynamic-nogate-randinit": ["cola", "stsb", "sst2"]}


def margins(results: list[dict], tasks: list[str], n_seeds: int, tuned_on: str = "cola") -> str:
    """Dynamic LoRA's average minus the better static LoRA's (of its two lrs) and minus AdaLoRA's, over the tasks
    where every seed of each of these methods has finished; once with and once without the lr-tuning task."""
    methods = ["dynamic", "lora", "lora-lr1e-3", "peft-adalora"]
    complete = [t for t in tasks if all((seed_stats(results, t, m) or (0, 0, 0))[2] == n_seeds for m in methods)]
    lines = []
    for label, subset in (("all", complete), (f"without {tuned_on}", [t for t in complete if t != tuned_on])):
        if not subset:
            lines.append(f"- {label}: — (no task where all of {', '.join(methods)} have finished every seed)")
            continue
        avg = {m: statistics.mean(seed_stats(results, t, m)[0] for t in subset) for m in methods}
        lora = max(("lora", "lora-lr1e-3"), key=avg.__getitem__)
        lines.append(
            f"- {label} ({', '.join(subset)}): dynamic {avg['dynamic']:.2f}; better static LoRA ({lora}) "
            f"{avg[lora]:.2f} → **{avg['dynamic'] - avg[lora]:+.2f}**; peft-adalora {avg['peft-adalora']:.2f} → "
            f"**{avg['dynamic'] - avg['peft-adalora']:+.2f}**"
        )
    return "\n".join(lines)


# What each difference of two rows isolates (a − b, paired by seed: a seed fixes data order and head init).
CONTRASTS = [
    ("gradient-started components: lora-gradinit − lora-lr1e-3 (static, same lr)", "lora-gradinit", "lora-lr1e-3"),
    ("re-allocation alone: dynamic-nogate − lora-gradinit (same init and lr)", "dynamic-nogate", "lora-gradinit"),
    ("input-feature gate: dynamic − dynamic-nogate", "dynamic", "dynamic-nogate"),
    ("Dynamic LoRA − static LoRA at 1e-3", "dynamic", "lora-lr1e-3"),
    ("Dynamic LoRA − static LoRA at 2e-3", "dynamic", "lora"),
    ("Dynamic LoRA − PEFT LoRA", "dynamic", "peft-lora"),
    ("Dynamic LoRA − PEFT AdaLoRA", "dynamic", "peft-adalora"),
    ("this design − the first (random init), gate on", "dynamic", "dynamic-randinit"),
    ("this design − the first (random init), gate off", "dynamic-nogate", "dynamic-nogate-randinit"),
    ("dynlora LoRA − PEFT LoRA (same algorithm and lr)", "lora", "peft-lora"),
]


def paired_differences(results: list[dict], task: str, a: str, b: str) -> list[float]:
    """100 × (score of a − score of b) for each seed both have finished on ``task``."""
    score = {(r["method"], r["seed"]): 100 * run_score(r["metrics"]) for r in results if r["task"] == task}
    return [score[(a, s)] - score[(b, s)] for m, s in sorted(score) if m == a and (b, s) in score]


def contrast_table(results: list[dict], tasks: list[str]) -> str:
    """Markdown: each contrast's paired difference per task (mean ± std over seeds, n) and its mean over tasks
    (given once every task has one)."""
    lines = ["| contrast | " + " | ".join(tasks) + " | avg |", "|" + "---|" * (len(tasks) + 2)]
    for label, a, b in CONTRASTS:
        diffs = [paired_differences(results, t, a, b) for t in tasks]
        cells = [
            f"{statistics.mean(d):+.2f} ± {statistics.stdev(d) if len(d) > 1 else 0:.2f} (n={len(d)})" if d else "—"
            for d in diffs
        ]
        avg = f"{statistics.mean(statistics.mean(d) for d in diffs):+.2f}" if all(diffs) else "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join(lines)


def run_timed(arguments: list[str], out: Path, record: dict | None = None) -> int:
    """Run ``dynlora ARGUMENTS`` (a resumable comparison) and append its wall time to OUT/wall_time.jsonl; a Ctrl-C
    reaches the comparison too, which checkpoints and stops, and the time is still recorded."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "dynlora.cli", *arguments, "--no-progress"])
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = proc.wait()
    with open(out / "wall_time.jsonl", "a") as f:
        f.write(
            json.dumps({"started": started, "seconds": time.time() - started, "exit": code, **(record or {})}) + "\n"
        )
    if code != 0:
        print(f"the comparison stopped (exit {code}); what finished is written below. Run again to resume.")
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2: one per core here)")
    parser.add_argument("--output-dir", default="runs/glue-benchmark", help="run directories and results.jsonl")
    parser.add_argument("--no-run", action="store_true", help="only write RESULTS.md from what has finished")
    parser.add_argument("--methods", help="run only these of the plan's methods now (comma-separated); the rest later")
    args = parser.parse_args()
    out = Path(args.output_dir)
    plan = yaml.safe_load(PLAN.read_text())
    command = f"dynlora compare --config {PLAN.relative_to(HERE.parent)} --jobs {args.jobs} --output-dir {out}"
    if not args.no_run:
        only = ["--methods", args.methods] if args.methods else []
        run_timed(command.split()[1:] + only, out, {"methods": args.methods})

    results = read_results(out / "results.jsonl")
    if not results:
        sys.exit(f"error: no finished runs in {out}/results.jsonl yet; run without --no-run first")
    (HERE / "results").mkdir(exist_ok=True)
    shutil.copyfile(out / "results.jsonl", HERE / "results" / "glue.jsonl")
    write_report(out)
    for png in ("comparison.png", "final_ranks.png"):
        if (out / png).is_file():
            shutil.copyfile(out / png, HERE / "results" / f"glue_{png}")
    tasks = [t for t in plan["tasks"] if any(r["task"] == t for r in results)]
    methods = plan["methods"]
    expected = sum(len(RECORD_ONLY.get(m, plan["tasks"])) for m in methods) * len(plan["seeds"])
    walls = (
        [json.loads(line) for line in (out / "wall_time.jsonl").read_text().splitlines()]
        if (out / "wall_time.jsonl").is_file()
        else []
    )
    hours = sum(w["seconds"] for w in walls) / 3600
    invocations = sum(w.get("invocations", 1) for w in walls)  # a carried-over record may stand for several
    so_far = " so far" if len(results) < expected else ""
    import peft
    import torch
    import transformers

    body = f"""## GLUE dev quality (MiniLM-L6, {len(results)} of {expected} runs finished)

`python benchmarks/glue.py --jobs {args.jobs}` (= `{command}`) — protocol in [README.md](README.md), plan in
[glue_plan.yaml](glue_plan.yaml). Updated {date.today().isoformat()}; {platform.machine()}, {os.cpu_count()} cores,
CPU only; python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},
peft {peft.__version__}. Wall time{so_far}: {hours:.2f} h over {invocations} invocation(s) of the command.

Main metric × 100 of the final model on the dev set, mean ± std over seeds (n = seeds finished). The average
is over the tasks in this table only, and only for methods that finished all of them. params: trainable
parameters — 74,498 with a 2-class head, 74,113 with STS-B's single output; PEFT AdaLoRA's count is its starting
rank-12 size (it ends at the same budget). Step time and memory are in their own sections (measured alone: runs
here share the machine with each other, so their timings are not comparable).

{summary_table(results, tasks, methods)}

Dynamic LoRA's margins on the average (the targets: ≥ +1.0 over static LoRA, ≥ 0 over AdaLoRA), over the tasks
every seed of these methods has finished; static LoRA at the better of its two lrs (protocol):

{margins(results, tasks, len(plan["seeds"]))}

What each difference isolates, paired by seed (a seed fixes the data order and the head's init), main metric
× 100, mean ± std over seeds:

{contrast_table(results, tasks)}

![scores](results/glue_comparison.png)

Final rank allocation of the `dynamic` runs (mean over seeds):

![final ranks](results/glue_final_ranks.png)

Raw per-run results: [results/glue.jsonl](results/glue.jsonl)."""
    write_section(HERE / "RESULTS.md", "glue", body)
    print(summary_table(results, tasks, methods))


if __name__ == "__main__":
    main()
