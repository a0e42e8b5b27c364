"""The GLUE quality benchmark: every method × task × seed of benchmarks/glue_plan.yaml, then RESULTS.md.

    python benchmarks/glue.py [--jobs 2] [--output-dir runs/glue-benchmark] [--no-run]

Runs ``dynlora compare --config benchmarks/glue_plan.yaml`` (resumable: start the same command again after an
interruption and only what is missing runs), appends each invocation's wall time to OUTPUT_DIR/wall_time.jsonl,
then writes what has finished — complete or not — to the GLUE section of benchmarks/RESULTS.md: the quality table
(mean ± std over seeds), trainable parameters, training seconds per step of every method relative to static LoRA,
the final rank allocation picture, versions, date and the total wall time. ``--no-run`` only writes the section.
Raw per-run results: benchmarks/results/glue.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml
from step_time import write_section

from dynlora.compare import read_results, summary_table
from dynlora.report import write_report

HERE = Path(__file__).resolve().parent
PLAN = HERE / "glue_plan.yaml"


def seconds_per_step(run_dir: Path) -> float | None:
    """Training seconds per step of one run from its log; None if it was resumed (its clock restarted)."""
    points = [(r["step"], r["elapsed"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())
              if "elapsed" in r]  # fmt: skip
    if not points or any(b[1] < a[1] for a, b in zip(points, points[1:], strict=False)):
        return None
    return points[-1][1] / points[-1][0]


def step_time_table(out: Path, results: list[dict], tasks: list[str], methods: list[str]) -> str:
    """Per task: median seconds/step of each method's runs divided by static LoRA's (same machine load)."""
    rows = ["| method | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for method in methods:
        cells = []
        for task in tasks:
            per = {}
            for m in (method, "lora"):
                times = [seconds_per_step(out / task / m / f"seed{r['seed']}") for r in results
                         if r["task"] == task and r["method"] == m]  # fmt: skip
                times = [t for t in times if t is not None]
                per[m] = statistics.median(times) if times else None
            cells.append(f"{per[method] / per['lora']:.3f}×" if per[method] and per["lora"] else "—")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
        out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        only = ["--methods", args.methods] if args.methods else []
        code = subprocess.call([sys.executable, "-m", "dynlora.cli", *command.split()[1:], *only, "--no-progress"])
        with open(out / "wall_time.jsonl", "a") as f:
            record = {"started": started, "seconds": time.time() - started, "exit": code, "methods": args.methods}
            f.write(json.dumps(record) + "\n")
        if code != 0:
            print(f"the comparison stopped (exit {code}); what finished is written below. Run again to resume.")

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
    expected = len(plan["tasks"]) * len(methods) * len(plan["seeds"])
    walls = [json.loads(line) for line in (out / "wall_time.jsonl").read_text().splitlines()] if (
        out / "wall_time.jsonl").is_file() else []  # fmt: skip
    hours = sum(w["seconds"] for w in walls) / 3600
    import peft
    import torch
    import transformers

    body = f"""## GLUE dev quality (MiniLM-L6, {len(results)} of {expected} runs finished)

`python benchmarks/glue.py --jobs {args.jobs}` (= `{command}`) — protocol in [README.md](README.md), plan in
[glue_plan.yaml](glue_plan.yaml). Updated {date.today().isoformat()}; {platform.machine()}, 2 cores, CPU only;
python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},
peft {peft.__version__}. Wall time so far: {hours:.2f} h over {len(walls)} invocation(s) of the command.

Main metric × 100 of the final model on the dev set, mean ± std over seeds (n = seeds finished). The average
is over the tasks in this table only, and only for methods that finished all of them.

{summary_table(results, tasks, methods)}

Training seconds per step relative to static `lora` (median over each task's un-resumed runs; the runs share
the machine {args.jobs} at a time, so these are rough — the step-time section is the careful measurement):

{step_time_table(out, results, tasks, methods)}

![scores](results/glue_comparison.png)

Final rank allocation of the `dynamic` runs (mean over seeds):

![final ranks](results/glue_final_ranks.png)

Raw per-run results: [results/glue.jsonl](results/glue.jsonl)."""
    write_section(HERE / "RESULTS.md", "glue", body)
    print(summary_table(results, tasks, methods))


if __name__ == "__main__":
    main()
