"""Peak resident memory of training each adapter method, as ratios to the frozen limit.

    python benchmarks/peak_memory.py [--model minilm|smollm2|moe] [--steps 5] [--batch 32] [--seq 64]

Each configuration of step_time.py trains ``--steps`` steps in a fresh process (so one method's allocations cannot
hide another's); the figure is that process's peak resident set size (``ru_maxrss``), which includes the Python
interpreter, torch and the loaded model — the same for every method — so the difference to the frozen limit is
what the method adds (adapter weights, their gradients and AdamW moments, activations it keeps for backward).

Writes benchmarks/results/peak_memory[_smollm2].json and the setup's peak-memory section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure_one(model: str, name: str, steps: int, batch: int, seq: int) -> None:
    """Child process: build one configuration, train, print the peak RSS in MiB."""
    import peft  # noqa: F401  imported by every configuration, so its own footprint is not charged to PEFT's
    import transformers
    from step_time import SETUPS, make_step

    transformers.logging.set_verbosity_error()
    setup = SETUPS[model]
    step = make_step(setup.train_configs()[name](), setup.batch(batch, seq))
    for _ in range(steps):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux reports KiB


def main() -> None:
    from step_time import SETUPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SETUPS), default="minilm", help="which setup (step_time.py)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration (median)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: the child process's configuration
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md/JSON")
    args = parser.parse_args()
    if args.one:
        measure_one(args.model, args.one, args.steps, args.batch, args.seq)
        return

    from common import write_section

    setup = SETUPS[args.model]
    configs = setup.train_configs()
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):  # round by round, so a drift of the machine hits every configuration alike
        for name in configs:
            child = [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--one",
                name,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"error: measuring {name!r} failed:\n{done.stderr[-2000:]}")
            samples[name].append(float(done.stdout.strip().splitlines()[-1]))
    peak = {name: statistics.median(values) for name, values in samples.items()}
    for name, values in samples.items():
        print(f"{name:<24} {peak[name]:>8.0f} MiB  (runs: {', '.join(f'{v:.0f}' for v in values)})")
    limit = peak["frozen limit"]
    if args.no_write:
        return
    command = "python benchmarks/peak_memory.py " + " ".join(sys.argv[1:])
    record = {
        "command": command.strip(),
        "date": date.today().isoformat(),
        "batch": [args.batch, args.seq],
        "steps": args.steps,
        "peak_rss_mib": peak,
        "runs_mib": samples,
    }
    (HERE / "results").mkdir(exist_ok=True)
    section = "peak_memory" if args.model == "minilm" else f"peak_memory_{args.model}"
    (HERE / "results" / f"{section}.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {m:.0f} | {m - limit:+.0f} | {m / limit:.3f}× |" for n, m in peak.items())
    body = f"""## Peak memory of training ({setup.title}; batch {args.batch}×{args.seq}, CPU)

`{record["command"]}` — {record["date"]}. Median over {args.repeats} fresh processes per configuration of
the peak resident set size after {args.steps} training steps (interpreter, torch, peft and the model included,
alike for all; the single runs are in the JSON).

| configuration | peak RSS (MiB) | over frozen limit (MiB) | / frozen limit |
|---|---|---|---|
{rows}

Raw figures: [results/{section}.json](results/{section}.json)."""
    write_section(HERE / "RESULTS.md", section, body)


if __name__ == "__main__":
    main()
