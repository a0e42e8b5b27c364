"""The learning-rate choice of the GLUE benchmark: each method tuned once, on CoLA, seed 0, 3 epochs.

    python benchmarks/lr_sweep.py [--output-root runs/sweep] [--no-run]

Rule: start from {1e-3, 2e-3} (the guide's 5e-4 leaves CoLA at MCC 0.0 here); while a method's best lr is the
largest tried, try the double. `dynamic-nogate` takes `dynamic`'s lr and `peft-lora` takes `lora`'s (an ablation
changes one thing; PEFT LoRA is the same algorithm as ours). Every run is a `dynlora compare` (resumable) in
OUTPUT_ROOT/cola-lr<lr>/; the chosen values go into glue_plan.yaml by hand, and the table into RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import write_section

from dynlora.training.compare import read_results

HERE = Path(__file__).resolve().parent
# What was run, per method (the doubling rule above, applied to what the runs printed).
GRID = {
    "dynamic": ["1e-3", "2e-3"],
    "lora": ["1e-3", "2e-3", "4e-3"],
    "peft-adalora": ["1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", default="runs/sweep")
    parser.add_argument("--no-run", action="store_true", help="only write RESULTS.md from what has finished")
    args = parser.parse_args()
    root = Path(args.output_root)
    lrs = sorted({lr for grid in GRID.values() for lr in grid}, key=float)
    for lr in lrs if not args.no_run else []:
        methods = ",".join(m for m, grid in GRID.items() if lr in grid)
        subprocess.check_call(
            [
                sys.executable,
                "-m",
                "dynlora.cli",
                "compare",
                "--tasks",
                "cola",
                "--methods",
                methods,
                "--seeds",
                "0",
                "--epochs",
                "3",
                "--lr",
                lr,
                "--no-progress",
                "--output-dir",
                str(root / f"cola-lr{lr}"),
            ]
        )
    score = {}
    for lr in lrs:
        for r in read_results(root / f"cola-lr{lr}" / "results.jsonl"):
            score[r["method"], lr] = 100 * r["metrics"]["validation"]["mcc"]
    rows = []
    for method, grid in GRID.items():
        cells = [
            f"{score[method, lr]:.1f}" if (method, lr) in score else ("—" if lr not in grid else "running")
            for lr in lrs
        ]
        done = {lr: score[method, lr] for lr in grid if (method, lr) in score}
        best = max(done, key=done.get) if done else "—"
        rows.append(f"| {method} | " + " | ".join(cells) + f" | {best} |")
    table = "\n".join(
        [f"| method | {' | '.join(f'lr {lr}' for lr in lrs)} | chosen |", "|" + "---|" * (len(lrs) + 2), *rows]
    )
    body = f"""## Learning rate, tuned once per method (CoLA dev MCC × 100, seed 0, 3 epochs)

`python benchmarks/lr_sweep.py` — q/v rank 8, batch 32, max length 128; the rule is in the script's docstring.
CoLA is therefore the tuning task of the GLUE table below: its seed-0 runs have these runs' settings.

{table}"""
    write_section(HERE / "RESULTS.md", "lr_sweep", body)
    print(table)


if __name__ == "__main__":
    main()
