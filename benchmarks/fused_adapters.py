"""What computing the adapters that read the same input together would save (issue 33): SmolLM2's q/k/v and gate/up.

    python benchmarks/fused_adapters.py [--rounds 40] [--runs 3] [--tokens 256]

Only the adapter path is timed, forward and backward, for the 30 layers of SmolLM2-135M at its shapes (hidden 576,
k/v 192 wide, MLP 1536), rank 8, the tokens of a batch of 4 × 64, each output added into a base output as
DynamicLoRALinear does (one addmm), with the input requiring grad (the layers below train too):

- separate: each adapter h = x Aᵀ, y += s·h Bᵀ (today);
- fused, concatenated each step: h = x [A₁; A₂; A₃]ᵀ once per group, then each y_i += s·h_i B_iᵀ (what fusing
  separately stored adapters costs: a cat of A forward, a split of its gradient backward);
- fused, stored together: the same with one parameter holding the group's A (the upper bound: no cat; the storage
  it needs would have to be re-split at every re-allocation, ranks differing per layer).

Variants are interleaved round by round; each figure is the median over rounds, in each of 3 runs. The saving is
stated against the adapter path itself and against a whole SmolLM2 step (the static LoRA step of
results/step_time_smollm2.json).
Writes benchmarks/results/fused_adapters.json and its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import write_section

HERE = Path(__file__).resolve().parent
LAYERS, HIDDEN, KV, MLP, RANK, SCALE = 30, 576, 192, 1536, 8, 2.0
GROUPS = {"q/k/v": (HIDDEN, KV, KV), "gate/up": (MLP, MLP)}  # out widths of the adapters reading one input


def make_group(outs: tuple[int, ...], tokens: int, g: torch.Generator) -> dict:
    a = [torch.randn(RANK, HIDDEN, generator=g).requires_grad_() for _ in outs]
    b = [(0.01 * torch.randn(o, RANK, generator=g)).requires_grad_() for o in outs]
    fused_a = torch.cat([t.detach() for t in a]).requires_grad_()
    base = [torch.randn(tokens, o, generator=g) for o in outs]
    grads = [torch.randn(tokens, o, generator=g) for o in outs]
    return {"a": a, "b": b, "fused_a": fused_a, "base": base, "grads": grads}


def separate(x: torch.Tensor, group: dict) -> list[torch.Tensor]:
    return [
        torch.addmm(y, F.linear(x, a), b.t(), alpha=SCALE)
        for a, b, y in zip(group["a"], group["b"], group["base"], strict=True)
    ]


def fused(x: torch.Tensor, group: dict, stored: bool) -> list[torch.Tensor]:
    h = F.linear(x, group["fused_a"] if stored else torch.cat(group["a"]))
    parts = h.split(RANK, dim=1)
    return [torch.addmm(y, p, b.t(), alpha=SCALE) for p, b, y in zip(parts, group["b"], group["base"], strict=True)]


def step(x: torch.Tensor, layers: list[dict], variant: str) -> float:
    start = time.perf_counter()
    outs, grads = [], []
    for layer in layers:
        for group in layer.values():
            outs += separate(x, group) if variant == "separate" else fused(x, group, variant == "fused, stored")
            grads += group["grads"]
    torch.autograd.backward(outs, grads)
    elapsed = time.perf_counter() - start
    x.grad = None
    for layer in layers:
        for group in layer.values():
            for t in (*group["a"], *group["b"], group["fused_a"]):
                t.grad = None
    return elapsed


def measure(x: torch.Tensor, layers: list[dict], variants: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of each variant over ``rounds`` interleaved rounds, after 3 of warm-up."""
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds + 3):
        for v in variants:
            t = step(x, layers, v)
            if r >= 3:
                times[v].append(t)
    return {v: statistics.median(ts) for v, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--runs", type=int, default=3, help="whole measurements, for the spread")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    layers = [{name: make_group(outs, args.tokens, g) for name, outs in GROUPS.items()} for _ in range(LAYERS)]
    x = torch.randn(args.tokens, HIDDEN, generator=g).requires_grad_()
    variants = ["separate", "fused, concatenated each step", "fused, stored"]
    runs = [measure(x, layers, variants, args.rounds) for _ in range(args.runs)]
    step_file = HERE / "results" / "step_time_smollm2.json"
    lora_step = json.loads(step_file.read_text())["train_step_median_s"]["dynlora LoRA r=8"]
    result = {
        "command": "python benchmarks/fused_adapters.py "
        + f"--rounds {args.rounds} --runs {args.runs} --tokens {args.tokens}",
        "torch_threads": torch.get_num_threads(),
        "adapter_path_median_ms": [{v: 1e3 * m for v, m in run.items()} for run in runs],
        "saving_of_a_static_lora_step_percent": [
            {v: 100 * (run["separate"] - run[v]) / lora_step for v in variants[1:]} for run in runs
        ],
    }
    (HERE / "results" / "fused_adapters.json").write_text(json.dumps(result, indent=1) + "\n")

    def cells(v: str) -> str:
        if v == "separate":
            return " / ".join(f"{1e3 * run[v]:.1f}" for run in runs) + " | —"
        saved = " / ".join(f"{1e3 * (run['separate'] - run[v]):+.1f}" for run in runs)
        share = " / ".join(f"{100 * (run['separate'] - run[v]) / lora_step:+.2f}" for run in runs)
        return " / ".join(f"{1e3 * run[v]:.1f}" for run in runs) + f" | {saved} ms ({share} % of a step)"

    rows = "\n".join(f"| {v} | {cells(v)} |" for v in variants)
    body = f"""## Fusing the adapters that read one input (issue 33)

`{result["command"]}` ({result["torch_threads"]} torch threads): SmolLM2's q/k/v and gate/up adapters of all 30
layers at rank 8, the adapter path only (forward + backward), median of {args.rounds} interleaved rounds, in
{args.runs} runs (a / b / c). The saving is against separate adapters, and against a whole static LoRA step of
SmolLM2 ({1e3 * lora_step:.0f} ms, results/step_time_smollm2.json).

| adapter path | median ms | saving |
|---|---|---|
{rows}
"""
    write_section(HERE / "RESULTS.md", "fused_adapters", body)
    print(body)


if __name__ == "__main__":
    main()
