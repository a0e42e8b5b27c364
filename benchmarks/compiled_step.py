"""Whether ``torch.compile`` pays for a training step (issue 33): SmolLM2 all-linear, eager against compiled.

    python benchmarks/compiled_step.py [--rounds 8] [--runs 3] [--backend inductor]

The setup of step_time.py's ``smollm2`` (the shipped SmolLM2-135M, rank 8 on all 7 projections of its 30 layers,
batch 4 × 64 on the CPU): the frozen limit, dynlora static LoRA and Dynamic LoRA with the defaults (timed at the
budget's ranks, as after its start is pruned), each eager and
with its forward compiled (``torch.compile(model)``; backward through the compiled graph). Each compiled model's
first step is timed on its own (the compile); the steps after are interleaved round by round with the others, the
figure a median over rounds, in each of ``--runs`` measurement passes (the compile is paid once).

A compiled graph holds each layer's rank as a constant, so a re-allocation that changes ranks compiles the forward
again; after ``torch._dynamo.config.recompile_limit`` recompiles the forward runs eager for the rest of the run. How
often that happens over Dynamic LoRA's default schedule is counted with a backend that only counts (what decides a
recompile is the trace, whichever backend compiles it), on a short batch.
Writes benchmarks/results/compiled_step.json and its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from common import write_section
from step_time import PRUNED, SETUPS, interleaved_medians, make_step

HERE = Path(__file__).resolve().parent
SETUP = SETUPS["smollm2"]
CONFIGS = {
    "frozen limit": SETUP.frozen_limit,
    "dynlora static LoRA": SETUP.dynlora_lora,
    # The default input adaptation, at the budget's ranks: its steps once the default start is pruned.
    "Dynamic LoRA": lambda: SETUP.dynamic(SETUP.config().input_adaptive, **PRUNED),
}


def compiled_steps(batch: dict[str, torch.Tensor], backend: str) -> tuple[dict, dict[str, float]]:
    """Every configuration's step, eager and compiled; the seconds of each compiled one's first step."""
    steps, compile_s = {}, {}
    for name, build in CONFIGS.items():
        steps[name] = make_step(build(), batch)
        model = build()
        model.forward = torch.compile(model.forward, backend=backend)  # the module stays itself for its methods
        step = make_step(model, batch)
        t0 = time.perf_counter()
        step()
        compile_s[name] = time.perf_counter() - t0
        steps[f"{name}, compiled"] = step
    return steps, compile_s


def recompiles_over_a_schedule(steps: int) -> dict[str, int]:
    """Compiles of Dynamic LoRA's forward over every step of a ``steps``-step run with the default schedule (module
    doc); its re-allocations are fractions of the run, so any length has as many."""
    compiles = 0

    def counting(graph: torch.fx.GraphModule, _inputs: list) -> object:
        nonlocal compiles
        compiles += 1
        return graph.forward

    torch._dynamo.reset()
    model = SETUP.dynamic(SETUP.config().input_adaptive)
    model.forward = torch.compile(model.forward, backend=counting)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.bind_optimizer(optimizer, steps)
    batch = SETUP.batch(1, 16)
    for step in range(1, steps + 1):
        model(**batch).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    return {
        "reallocations": len(model.allocation_events()),
        "compiles": compiles,
        "recompile_limit": torch._dynamo.config.recompile_limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="measured steps per configuration and pass (median)")
    parser.add_argument("--runs", type=int, default=3, help="measurement passes (the spread)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend timed")
    parser.add_argument("--run-steps", type=int, default=100, help="run length of the schedule counted")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md/JSON")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    steps, compile_s = compiled_steps(SETUP.batch(4, 64), args.backend)
    passes = [interleaved_medians(steps, args.rounds, warmup=2) for _ in range(args.runs)]
    ratio = {name: [p[f"{name}, compiled"] / p[name] for p in passes] for name in CONFIGS}
    over_frozen = {
        kind: [p[f"dynlora static LoRA{kind}"] / p[f"frozen limit{kind}"] for p in passes]
        for kind in ("", ", compiled")
    }
    schedule = recompiles_over_a_schedule(args.run_steps)

    def spread(xs: list[float]) -> str:
        return ", ".join(f"{x:.3f}" for x in xs)

    lines = [
        f"{name}: compiled / eager step {spread(ratio[name])}; compile {compile_s[name]:.0f} s" for name in CONFIGS
    ]
    lines.append(
        f"static LoRA / frozen limit: eager {spread(over_frozen[''])}; compiled {spread(over_frozen[', compiled'])}"
    )
    lines.append(
        f"Dynamic LoRA over a {args.run_steps}-step schedule: {schedule['reallocations']} re-allocations, the forward "
        f"compiled {schedule['compiles']} times (recompile limit {schedule['recompile_limit']})"
    )
    print("\n".join(lines))
    if args.no_write:
        return
    record = {
        "backend": args.backend,
        "torch": torch.__version__,
        "medians_s": passes,
        "compile_s": compile_s,
        "compiled_over_eager": ratio,
        "static_over_frozen": over_frozen,
        "schedule": schedule,
    }
    (HERE / "results" / "compiled_step.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(
        f"| {name} | {spread(ratio[name])} | {statistics.median(p[name] for p in passes) * 1000:.0f} ms | "
        f"{compile_s[name]:.0f} s |"
        for name in CONFIGS
    )
    write_section(
        HERE / "RESULTS.md",
        "compiled-step",
        f"""## torch.compile of a training step (SmolLM2-135M all-linear, batch 4×64, CPU, backend {args.backend})

`python benchmarks/compiled_step.py` ({args.runs} interleaved passes of {args.rounds} rounds, torch
{torch.__version__}).

| configuration | compiled / eager step (each pass) | eager step | first compiled step (the compile) |
|---|---|---|---|
{rows}

- dynlora static LoRA / frozen limit: eager {spread(over_frozen[""])}; compiled {spread(over_frozen[", compiled"])}.
- Dynamic LoRA over a {args.run_steps}-step default schedule: {schedule["reallocations"]} re-allocations; the forward
  was compiled {schedule["compiles"]} times (dynamo's recompile limit is {schedule["recompile_limit"]}: past it the
  forward runs eager for the rest of the run).
""",
    )


if __name__ == "__main__":
    main()
