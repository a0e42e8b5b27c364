"""Training step time of adapter methods as ratios to the frozen limit, and merged inference vs the base model.

    python benchmarks/step_time.py [--model minilm|smollm2|moe] [--rounds 15] [--batch 32] [--seq 64]

Three setups, each on one fixed batch of random token ids on the CPU:
- ``minilm`` (default): MiniLM-L6 sequence classification, adapters on query/value (12 layers), head trainable;
- ``smollm2``: the shipped SmolLM2-135M as a causal LM, adapters on all 7 projections of its 30 layers (210);
- ``moe``: a small random Qwen3-MoE causal LM (4 layers of 8 experts, 2 per token), adapters on q_proj, v_proj and
  every expert of the fused expert weights (the mixtures' default targets): PEFT LoRA adapts the experts through
  its ``target_parameters``; AdaLoRA has no such path and is left out.
Configurations are interleaved round by round (one step of each per round) so machine noise hits them alike; each
figure is the median over rounds after warm-up, and Dynamic LoRA's overhead over static LoRA the median over rounds
of their ratio within a round. A step is forward + backward + AdamW step + zero_grad.

- frozen limit: the same model with no adapter, backward through every layer (input gradients only), no weight
  gradients but the classifier head's. No adapter method can be faster than this.
- dynlora LoRA r=8 (static), PEFT LoRA r=8, on the same layers; dynlora LoRA r=8 at Dynamic LoRA's capacity (16
  rows of A and columns of B, 8 of them active, no engine): what the capacity alone costs; dynlora LoRA r=8 built
  twice: the ratio of two identical models is the noise floor of a paired ratio on this machine.
- Dynamic LoRA (same budget as LoRA r=8) at the budget's ranks, as its steps are once the start is pruned, input gate
  off and on ("mergeable"): update_and_allocate every step; and its default over-parameterised start
  (``start_ratio=1.5``: rank 12 on every layer), timed before its pruning.
- PEFT AdaLoRA init_r=12 -> target_r=8, with its update_and_allocate every step (its orthogonality loss is in its
  forward).
Re-allocations happen once per `interval` (default 5 % of a run), so they are timed on their own and amortised
over a run with the default schedule; the engine's per-step cost is also timed directly, since a 0.1 % difference
is far below the noise of a step-time median: update_and_allocate is timed inside whole training steps, after the
optimizer step as every training loop calls it, so it meets the caches as a real step leaves them.
Merged inference: dynlora's merge_and_unload() model vs the untouched base model, eval forward under no_grad.

Writes benchmarks/results/step_time[_smollm2].json and the setup's step-time section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch
import transformers
from common import write_section
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dynlora import DynamicLoRAConfig, default_model_path, get_dynlora_model
from dynlora.allocator import Schedule
from dynlora.input_statistics import folds_at
from dynlora.moe_targets import expert_parameters
from dynlora.shipped_models import decoder_model_path

HERE = Path(__file__).resolve().parent
QV = ["query", "value"]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dynamic LoRA at the budget's ranks, as it trains once its default over-parameterised start is pruned (from 80 % of
# the run at the latest): the steps its overhead is judged on.
PRUNED = {"start_ratio": 1.0}


@dataclass
class Setup:
    """A model to time: how to load it, which layers the adapters go on, its trainable head, its batch."""

    title: str
    targets: list[str]
    head: list[str] | None
    causal_lm: bool
    device: str = "cpu"
    random_model: Callable[[], torch.nn.Module] | None = None  # built from a config, instead of a shipped model
    vocab: int = 30000

    def load(self) -> torch.nn.Module:
        torch.manual_seed(0)
        if self.random_model is not None:
            model = self.random_model()
        elif self.causal_lm:
            model = AutoModelForCausalLM.from_pretrained(str(decoder_model_path()))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
        return model.to(self.device)  # before the adapters are made: they are made where the weights are

    def batch(self, size: int, seq: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(self.vocab // 30, self.vocab, (size, seq), generator=torch.Generator().manual_seed(0))
        labels = ids if self.causal_lm else torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        return {k: v.to(self.device) for k, v in batch.items()}

    def config(self, **overrides) -> DynamicLoRAConfig:
        return DynamicLoRAConfig(rank=8, alpha=16, target_modules=self.targets, **overrides)

    def frozen_limit(self) -> torch.nn.Module:
        model = self.load()
        model.requires_grad_(False)
        for name in self.head or []:
            getattr(model, name).requires_grad_(True)
        # The embedding output requires grad so backward still runs through every layer, as with adapters.
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
        return model

    def dynlora_lora(self, max_rank: int | None = None) -> torch.nn.Module:
        static = self.config(reallocate=False, input_adaptive=None, init="lora", max_rank=max_rank)
        return get_dynlora_model(self.load(), static)

    def dynamic(self, gate: str | None, **overrides) -> torch.nn.Module:
        return get_dynlora_model(self.load(), self.config(input_adaptive=gate, **overrides))

    def peft_lora(self) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        model = self.load()
        modules = [t for t in self.targets if t != "experts"]
        experts = [name for name in expert_parameters(model) if "experts" in self.targets]  # PEFT's ParamWrapper
        cfg = LoraConfig(
            r=8, lora_alpha=16, target_modules=modules, target_parameters=experts or None, modules_to_save=self.head
        )
        return get_peft_model(model, cfg)

    def peft_adalora(self) -> torch.nn.Module:
        from peft import AdaLoraConfig, get_peft_model

        cfg = AdaLoraConfig(
            init_r=12,
            target_r=8,
            lora_alpha=16,
            target_modules=self.targets,
            total_step=1000,
            tinit=0,
            tfinal=0,
            deltaT=10,
            modules_to_save=self.head,
        )
        return get_peft_model(self.load(), cfg)

    def train_configs(self) -> dict[str, Callable[[], torch.nn.Module]]:
        configs = {
            "frozen limit": self.frozen_limit,
            "dynlora LoRA r=8": self.dynlora_lora,
            "dynlora LoRA r=8, capacity 16": lambda: self.dynlora_lora(max_rank=16),
            "Dynamic LoRA, gate off": lambda: self.dynamic(None, **PRUNED),
            "Dynamic LoRA, gate on": lambda: self.dynamic("mergeable", **PRUNED),
            # The default over-parameterised start, timed before any pruning: its costliest steps.
            "Dynamic LoRA, start 1.5x": lambda: self.dynamic(None, start_ratio=1.5),
            "PEFT LoRA r=8": self.peft_lora,
            "PEFT AdaLoRA 12->8": self.peft_adalora,
        }
        if "experts" in self.targets:  # PEFT's AdaLoRA adapts modules only, not a fused experts weight
            del configs["PEFT AdaLoRA 12->8"]
        return configs


def small_qwen3_moe() -> torch.nn.Module:
    """A random Qwen3-MoE at a size this CPU times in seconds: 4 layers of 8 experts, 2 routed per token."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        tie_word_embeddings=True,
    )
    return Qwen3MoeForCausalLM(config)


SETUPS = {
    "minilm": Setup("MiniLM-L6, query/value: 12 adapted layers", QV, ["classifier"], causal_lm=False),
    "smollm2": Setup("SmolLM2-135M, all 7 projections of 30 layers: 210 adapted layers", PROJECTIONS, None, True),
    "moe": Setup(
        "Qwen3-MoE (random, hidden 256), q_proj/v_proj and 8 experts x 2 fused weights of 4 layers: 72 updates",
        ["q_proj", "v_proj", "experts"],
        None,
        True,
        random_model=small_qwen3_moe,
        vocab=4096,
    ),
}
# A long run's step count for binding the schedule: no re-allocation falls inside the timed steps.
BIND_STEPS = 100_000


def make_step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: torch.dtype | None = None
) -> Callable[..., float]:
    """One training step of ``model`` on ``batch`` (forward and backward under autocast to ``autocast`` if given).
    The step returns the seconds its method's after-step call took (dynlora's update_and_allocate, AdaLoRA's
    update_and_allocate), made with the step number ``at`` when given, else the step count."""
    model.train()
    # The frozen limit of a language model trains nothing: a dummy parameter keeps the step's shape.
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad] or [torch.nn.Parameter(torch.zeros(1, device=device))]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    after_step: Callable[[int], object] = lambda _step: None  # noqa: E731
    if hasattr(model, "update_and_allocate") and hasattr(model, "bind_optimizer"):  # dynlora
        model.bind_optimizer(optimizer, BIND_STEPS)
        after_step = model.update_and_allocate
    elif hasattr(getattr(model, "base_model", None), "update_and_allocate"):  # PEFT AdaLoRA
        after_step = model.base_model.update_and_allocate
    count = 0

    def step(at: int | None = None) -> float:
        nonlocal count
        count += 1
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        t0 = time.perf_counter()
        after_step(count if at is None else at)
        seconds = time.perf_counter() - t0
        optimizer.zero_grad(set_to_none=True)
        return seconds

    return step


def engine_costs(setup: Setup, batch: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    """Median seconds of update_and_allocate, with the default input adaptation, on an ordinary step, on a step that
    would fold input statistics in (with the mergeable one) and on one that scores importance (the steps leading to
    a re-allocation), of one re-allocation, and what a whole re-allocation step costs more than an ordinary one."""
    gate = setup.config().input_adaptive
    model = setup.dynamic(gate, **PRUNED)
    step = make_step(model, batch)
    for _ in range(3):  # Adam state exists, B is non-zero
        step()
    schedule, every = model.engine.schedule, model.engine.config.input_norm_every
    ordinary, fold, scored = every + 1, 2 * every, schedule.warmup - 1  # none re-allocates
    assert not (schedule.is_scored(ordinary) or schedule.is_scored(fold)) and schedule.is_scored(scored)
    assert not folds_at(ordinary, every) and folds_at(fold, every) and not folds_at(scored, every)
    times: dict[str, list[float]] = {"update_s": [], "fold_update_s": [], "scored_update_s": [], "reallocation_s": []}
    layers = list(model.lora_layers())
    for i in range(rounds):
        for key, at in (("update_s", ordinary), ("fold_update_s", fold), ("scored_update_s", scored)):
            # Timed where every training loop calls it: after the optimizer step, in a whole training step, with
            # the caches as that step leaves them.
            times[key].append(step(at))
        targets = {n: (6 if (j + i) % 2 else 10) for j, n in enumerate(layers)}  # half shrink, half grow
        t0 = time.perf_counter()
        model.engine.resize(targets)
        times["reallocation_s"].append(time.perf_counter() - t0)
    # A re-allocation step whole: with init="gradient" its forward/backward also measures ∂L/∂W of every layer
    # (probe.py), and grown components are pointed along it. Timed as the step-median difference of a model that
    # re-allocates at every step and one that never does in the window.
    always = setup.dynamic(gate, warmup=1, interval=1, final=BIND_STEPS, **PRUNED)
    pair = {"every step": make_step(always, batch), "never": make_step(setup.dynamic(gate, **PRUNED), batch)}
    steps = interleaved_medians(pair, rounds, warmup=3)
    return {
        **{key: statistics.median(ts) for key, ts in times.items()},
        "reallocation_step_extra_s": steps["every step"] - steps["never"],
    }


def engine_seconds_per_run(setup: Setup, engine: dict[str, float], run_steps: int) -> tuple[float, dict[str, int]]:
    """The engine's total seconds over a run of ``run_steps`` with the default settings, and the step counts: with
    the mergeable input adaptation every step gathers input statistics and the fold steps fold them in (none by
    default); the scored ones update importance, re-allocation
    steps (and, with init="gradient", the first step, which measures ∂L/∂W) cost what a re-allocation step costs
    more."""
    config = setup.config()
    schedule = Schedule.resolve(config, run_steps)
    steps = range(1, run_steps + 1)
    counts = {
        "steps": run_steps,
        "folds": sum(folds_at(t, config.input_norm_every) for t in steps)
        if config.input_adaptive == "mergeable"
        else 0,
        "scored": sum(schedule.is_scored(t) for t in steps),
        "reallocations": sum(schedule.is_reallocation(t) for t in steps),
    }
    special = counts["reallocations"] + (config.init == "gradient")
    # A re-allocation step costs at least the re-allocation itself, whatever the noise of two step medians says.
    special_s = max(engine["reallocation_step_extra_s"], engine["reallocation_s"])
    more = {key: max(engine[key] - engine["update_s"], 0) for key in ("fold_update_s", "scored_update_s")}
    seconds = (
        run_steps * engine["update_s"]
        + counts["folds"] * more["fold_update_s"]
        + (counts["scored"] - counts["reallocations"]) * more["scored_update_s"]
        + special * special_s
    )
    return seconds, counts


def make_infer(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def infer() -> None:
        with torch.no_grad():
            model(**inputs)

    return infer


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Each function's seconds in each round after ``warmup`` rounds, the functions run one after another per round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, rounds, warmup).items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of a's step over b's in the same round: a machine that slows for a while slows both."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SETUPS), default="minilm", help="which setup (module doc)")
    parser.add_argument("--rounds", type=int, default=15, help="measured steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--run-steps", type=int, default=1000, help="run length for amortising re-allocations")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md/JSON")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # the head is newly initialised on purpose: no load report
    transformers.utils.logging.disable_progress_bar()

    setup = SETUPS[args.model]
    batch = setup.batch(args.batch, args.seq)
    steps = {name: make_step(build(), batch) for name, build in setup.train_configs().items()}
    # The same model built again: its ratio to the first is this machine's noise floor for a paired ratio.
    steps["dynlora LoRA r=8, again"] = make_step(setup.dynlora_lora(), batch)
    times = interleaved_times(steps, args.rounds, args.warmup)
    train = {name: statistics.median(ts) for name, ts in times.items()}
    limit = train["frozen limit"]
    static = train["dynlora LoRA r=8"]
    engine = engine_costs(setup, batch, args.rounds)
    engine_run_s, run_counts = engine_seconds_per_run(setup, engine, args.run_steps)
    engine_fraction = engine_run_s / args.run_steps / static

    merged = setup.dynlora_lora()
    with torch.no_grad():  # a non-zero adapter, so the merge really changes the weights
        for layer in merged.lora_layers().values():
            layer.lora_B.normal_(std=0.01)
    infer = interleaved_medians(
        {"base model": make_infer(setup.load(), batch), "dynlora merged": make_infer(merged.merge_and_unload(), batch)},
        args.rounds,
        args.warmup,
    )

    lines = [f"{'configuration':<30} {'median step':>12} {'x frozen limit':>15}"]
    lines += [f"{name:<30} {t * 1000:>10.0f}ms {t / limit:>14.3f}x" for name, t in train.items()]
    ratio_peft = static / train["PEFT LoRA r=8"]
    infer_ratio = infer["dynlora merged"] / infer["base model"]
    ada = train.get("PEFT AdaLoRA 12->8")
    dyn_vs_ada = {g: train[f"Dynamic LoRA, gate {g}"] / ada for g in ("off", "on")} if ada else None
    static_times = times["dynlora LoRA r=8"]
    measured = {g: paired_ratio(times[f"Dynamic LoRA, gate {g}"], static_times) - 1 for g in ("off", "on")}
    capacity = paired_ratio(times["dynlora LoRA r=8, capacity 16"], static_times) - 1
    again = paired_ratio(times["dynlora LoRA r=8, again"], static_times) - 1  # equal models: a difference is noise
    start = paired_ratio(times["Dynamic LoRA, start 1.5x"], static_times) - 1
    lines.append(f"dynlora static LoRA / PEFT LoRA step time: {ratio_peft:.3f}x")
    if dyn_vs_ada:
        lines.append(
            f"Dynamic LoRA / PEFT AdaLoRA step time: gate off {dyn_vs_ada['off']:.3f}x, on {dyn_vs_ada['on']:.3f}x"
        )
    lines.append(
        f"Dynamic LoRA over static LoRA, paired per round: gate off {measured['off']:+.2%}, on {measured['on']:+.2%}, "
        f"its start at 1.5x before pruning {start:+.2%}; static LoRA at capacity 16: {capacity:+.2%}; static LoRA "
        f"over an identical copy of itself (the noise floor): {again:+.2%}"
    )
    lines.append(
        f"engine, timed directly: {engine['update_s'] * 1000:.2f} ms/step, {engine['fold_update_s'] * 1000:.2f} ms "
        f"on a fold step, {engine['scored_update_s'] * 1000:.2f} ms on a scored step; a re-allocation step costs "
        f"{engine['reallocation_step_extra_s'] * 1000:+.0f} ms more (of it the re-allocation itself "
        f"{engine['reallocation_s'] * 1000:.1f} ms) -> {engine_fraction:.3%} of a static LoRA step over a "
        f"{args.run_steps}-step run"
    )
    lines.append(f"merged dynlora inference / base model inference: {infer_ratio:.3f}x")
    print("\n".join(lines))
    if args.no_write:
        return

    command = "python benchmarks/step_time.py " + " ".join(sys.argv[1:])
    env = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
    }
    record = {
        "command": command.strip(),
        "env": env,
        "batch": [args.batch, args.seq],
        "rounds": args.rounds,
        "train_step_median_s": train,
        "train_ratio_to_frozen_limit": {k: v / limit for k, v in train.items()},
        "dynlora_over_peft_lora": ratio_peft,
        "dynamic_over_peft_adalora": dyn_vs_ada,
        "dynamic_over_static_measured": measured,
        "capacity_16_over_static_measured": capacity,
        "start_over_static_measured": start,
        "static_over_identical_copy_measured": again,
        "engine_s": engine,
        "engine_fraction_of_static_step": engine_fraction,
        "engine_run_step_counts": run_counts,
        "run_steps_for_amortisation": args.run_steps,
        "inference_median_s": infer,
        "merged_over_base_inference": infer_ratio,
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = "step_time" if args.model == "minilm" else f"step_time_{args.model}"
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {t / limit:.3f}× |" for name, t in train.items())
    verdict = "met" if engine_fraction <= 0.005 else "**not met**"
    gradient_init = setup.config().init == "gradient"
    probe_note = " (it measures ∂L/∂W of every layer in its backward, as the first step does)" if gradient_init else ""
    versus_adalora = "- PEFT AdaLoRA: not run (it does not adapt fused expert weights)"
    if dyn_vs_ada:
        ratios = f"gate off **{dyn_vs_ada['off']:.3f}×**, gate on **{dyn_vs_ada['on']:.3f}×**"
        versus_adalora = f"- Dynamic LoRA / PEFT AdaLoRA step time: {ratios} (target < 1)"
    body = f"""## Training step time ({setup.title}; batch {args.batch}×{args.seq}, CPU)

`{record["command"]}` — {env["date"]}, {env["machine"]}; torch {env["torch"]}, transformers {env["transformers"]},
peft {env["peft"]}. Interleaved, median of {args.rounds} steps each after {args.warmup} warm-up steps.

| configuration | step time / frozen limit |
|---|---|
{rows}

- dynlora static LoRA / PEFT LoRA step time: **{ratio_peft:.3f}×** (target ≤ 1.00)
{versus_adalora}
- Dynamic LoRA's overhead over static LoRA, the median over rounds of the two steps' ratio in the same round (a
  difference of step medians moved by ±1.5 % between runs on MiniLM, ±5-10 % on SmolLM2): gate off (the default)
  {measured["off"]:+.2%}, gate on {measured["on"]:+.2%}, its default start (rank 12, before pruning) {start:+.2%};
  static LoRA at Dynamic LoRA's capacity, no engine: {capacity:+.2%}; static LoRA against an identical copy of
  itself, the noise floor of these ratios: {again:+.2%}. Timed directly, where training
  loops call it (after the optimizer step, in a whole step): update_and_allocate
  {engine["update_s"] * 1000:.2f} ms on an ordinary step, {engine["fold_update_s"] * 1000:.2f} ms on one that would
  fold input statistics in (the default input adaptation, {setup.config().input_adaptive}, has none),
  {engine["scored_update_s"] * 1000:.2f} ms on one that scores importance; a re-allocation step costs
  {engine["reallocation_step_extra_s"] * 1000:.0f} ms more than an ordinary one{probe_note} (the re-allocation itself
  {engine["reallocation_s"] * 1000:.1f} ms; the larger of the two is counted). Over a {args.run_steps}-step run with
  the default settings ({run_counts["folds"]} folds, {run_counts["scored"]} scored steps,
  {run_counts["reallocations"]} re-allocations) that is **{engine_fraction:.3%}** of a static LoRA step
  (target ≤ 0.5 %: {verdict}).
- merged dynlora model inference / base model inference: **{infer_ratio:.3f}×** (target: equal within noise)

Repeated runs move a median by about ±1.5 % on this 2-core machine: compare ratios taken within one run.

Raw figures: [results/{name}.json](results/{name}.json)."""
    write_section(HERE / "RESULTS.md", name, body)


if __name__ == "__main__":
    main()
