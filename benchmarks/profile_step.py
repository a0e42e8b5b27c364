"""Where a training step's time goes over the frozen step: torch.profiler on one model, three configurations.

    python benchmarks/profile_step.py [--model smollm2|minilm|moe] [--batch 4] [--seq 64] [--steps 5]

The frozen limit, dynlora's static LoRA and Dynamic LoRA (its defaults) of the step_time.py setup, each profiled
over ``--steps`` training steps after two warm-up steps, on the CPU. For every operator (``aten::mm``,
``aten::mul``, ``Optimizer.step``, ...) it reports the self time per step (the time in the operator itself, not in
the ones it calls) and how many times it runs per step; the table lists the operators that add the most to a step
over the frozen one, so the cost of the adapters reads as "which operators, how many calls". The configurations
are profiled one after the other, not interleaved: compare step_time.py's ratios for the totals, this for where
the difference lies.

Writes benchmarks/results/profile_<model>.json and the profile_<model> section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date
from pathlib import Path

import torch
import transformers
from common import write_section
from step_time import SETUPS, make_step
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
CONFIGS = ("frozen limit", "dynlora LoRA r=8", "Dynamic LoRA, gate off")
SHORT = {"frozen limit": "frozen", "dynlora LoRA r=8": "static LoRA", "Dynamic LoRA, gate off": "Dynamic LoRA"}


def profile_steps(step, steps: int) -> dict[str, dict[str, float]]:
    """Per operator: self CPU milliseconds and calls, per step, over ``steps`` profiled steps."""
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {
        event.key: {"ms": event.self_cpu_time_total / 1000 / steps, "calls": event.count / steps}
        for event in prof.key_averages()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SETUPS), default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per configuration")
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md/JSON")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    setup = SETUPS[args.model]
    batch = setup.batch(args.batch, args.seq)
    builders = setup.train_configs()
    ops = {name: profile_steps(make_step(builders[name](), batch), args.steps) for name in CONFIGS}
    totals = {name: sum(o["ms"] for o in ops[name].values()) for name in CONFIGS}
    calls = {name: sum(o["calls"] for o in ops[name].values()) for name in CONFIGS}
    frozen = ops["frozen limit"]

    def extra(name: str, op: str) -> float:
        return ops[name].get(op, {"ms": 0.0})["ms"] - frozen.get(op, {"ms": 0.0})["ms"]

    names = set().union(*ops.values())
    top = sorted(names, key=lambda op: -max(extra("dynlora LoRA r=8", op), extra("Dynamic LoRA, gate off", op)))
    top = top[: args.top]

    def cell(name: str, op: str) -> str:
        o = ops[name].get(op)
        return "—" if o is None else f"{o['ms']:.1f} ms ({o['calls']:.0f})"

    header = "| operator | " + " | ".join(SHORT[n] for n in CONFIGS) + " | static − frozen | Dynamic − static |"
    rows = [header, "|---|" + "---|" * (len(CONFIGS) + 2)]
    rows += [
        f"| `{op}` | "
        + " | ".join(cell(n, op) for n in CONFIGS)
        + f" | {extra('dynlora LoRA r=8', op):+.1f} ms | "
        + f"{extra('Dynamic LoRA, gate off', op) - extra('dynlora LoRA r=8', op):+.1f} ms |"
        for op in top
    ]
    rows.append(
        "| **all operators** | "
        + " | ".join(f"**{totals[n]:.0f} ms ({calls[n]:.0f})**" for n in CONFIGS)
        + f" | **{totals['dynlora LoRA r=8'] - totals['frozen limit']:+.0f} ms** | "
        + f"**{totals['Dynamic LoRA, gate off'] - totals['dynlora LoRA r=8']:+.0f} ms** |"
    )
    table = "\n".join(rows)
    print(table)
    if args.no_write:
        return

    command = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    record = {
        "command": command.strip(),
        "date": date.today().isoformat(),
        "machine": machine,
        "torch": torch.__version__,
        "batch": [args.batch, args.seq],
        "steps": args.steps,
        "self_cpu_ms_and_calls_per_step": ops,
    }
    name = f"profile_{args.model}"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    body = f"""## Where a step's time goes ({setup.title}; batch {args.batch}×{args.seq}, CPU)

`{record["command"]}` — {record["date"]}, {machine}; torch {torch.__version__}. torch.profiler over {args.steps}
steps of each configuration after two warm-up steps: each operator's self time per step (time in the operator
itself) and, in brackets, its calls per step, for the operators that add most over the frozen step. The profiler's
own overhead grows with the number of operator calls, so these totals exceed step_time.py's medians; read the
differences and the call counts.

{table}

Raw figures (every operator): [results/{name}.json](results/{name}.json)."""
    write_section(HERE / "RESULTS.md", name, body)


if __name__ == "__main__":
    main()
