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

from dynlora.compare import read_results, seed_stats, summary_table
from dynlora.report import write_report

HERE = Path(__file__).resolve().parent
PLAN = HERE / "glue_plan.yaml"


def average_without(results: list[dict], tasks: list[str], methods: list[str], left_out: str) -> str:
    """Each method's average over the tasks other than ``left_out`` (the lr-tuning task), where all finished."""
    others = [t for t in tasks if t != left_out]
    cells = []
    for method in methods:
        stats = [seed_stats(results, t, method) for t in others]
        means = [st[0] for st in stats if st is not None]
        if others and len(means) == len(others):
            cells.append(f"{method} {statistics.mean(means):.2f}")
    return ", ".join(cells) if cells else "— (no method has finished every other task yet)"


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
is over the tasks in this table only, and only for methods that finished all of them. params: trainable
parameters — 74,498 with a 2-class head, 74,113 with STS-B's single output; PEFT AdaLoRA's count is its starting
rank-12 size (it ends at the same budget). Step time and memory are in their own sections (measured alone: runs
here share the machine with each other, so their timings are not comparable).

{summary_table(results, tasks, methods)}

Average without CoLA, the task the learning rates were tuned on: {average_without(results, tasks, methods, "cola")}.

![scores](results/glue_comparison.png)

Final rank allocation of the `dynamic` runs (mean over seeds):

![final ranks](results/glue_final_ranks.png)

Raw per-run results: [results/glue.jsonl](results/glue.jsonl)."""
    write_section(HERE / "RESULTS.md", "glue", body)
    print(summary_table(results, tasks, methods))


if __name__ == "__main__":
    main()
