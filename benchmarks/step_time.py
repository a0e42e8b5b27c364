"""Training step time of adapter methods as ratios to the frozen limit, and merged inference vs the base model.

    python benchmarks/step_time.py [--rounds 15] [--batch 32] [--seq 64]

MiniLM-L6 sequence classification on CPU, one fixed batch of random token ids. Configurations are interleaved
round by round (one step of each per round) so machine noise hits them alike; each figure is the median over
rounds after warm-up. A step is forward + backward + AdamW step + zero_grad.

- frozen limit: the same model with no adapter, backward through every layer (input gradients only), no weight
  gradients but the classifier head's. No adapter method can be faster than this.
- dynlora LoRA r=8 and PEFT LoRA r=8, both on query/value with the head trainable.
Merged inference: dynlora's merge_and_unload() model vs the untouched base model, eval forward under no_grad.

Writes benchmarks/results/step_time.json and the step-time section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification

from dynlora import DynamicLoRAConfig, default_model_path, get_dynlora_model

HERE = Path(__file__).resolve().parent


def load_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)


def frozen_limit() -> torch.nn.Module:
    model = load_base()
    model.requires_grad_(False)
    model.classifier.requires_grad_(True)
    # Make the embedding output require grad so backward still runs through every layer, as with adapters.
    model.bert.embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    return model


def dynlora_lora() -> torch.nn.Module:
    return get_dynlora_model(load_base(), DynamicLoRAConfig(target_modules=["query", "value"], rank=8, alpha=16))


def peft_lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    return get_peft_model(load_base(), cfg)


TRAIN_CONFIGS: dict[str, Callable[[], torch.nn.Module]] = {
    "frozen limit": frozen_limit,
    "dynlora LoRA r=8": dynlora_lora,
    "PEFT LoRA r=8": peft_lora,
}


def make_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_infer(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def infer() -> None:
        with torch.no_grad():
            model(**inputs)

    return infer


def interleaved_medians(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_section(results_md: Path, name: str, body: str) -> None:
    """Replace (or append) the section between this benchmark's markers, keeping the rest of the file."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="measured steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--no-write", action="store_true", help="print only; do not update RESULTS.md/JSON")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # the head is newly initialised on purpose: no load report
    transformers.utils.logging.disable_progress_bar()

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (args.batch,))}

    steps = {name: make_step(build(), batch) for name, build in TRAIN_CONFIGS.items()}
    train = interleaved_medians(steps, args.rounds, args.warmup)
    limit = train["frozen limit"]

    merged = dynlora_lora()
    with torch.no_grad():  # a non-zero adapter, so the merge really changes the weights
        for layer in merged.lora_layers().values():
            layer.lora_B.normal_(std=0.01)
    infer = interleaved_medians(
        {"base model": make_infer(load_base(), batch), "dynlora merged": make_infer(merged.merge_and_unload(), batch)},
        args.rounds,
        args.warmup,
    )

    lines = [f"{'configuration':<22} {'median step':>12} {'x frozen limit':>15}"]
    lines += [f"{name:<22} {t * 1000:>10.0f}ms {t / limit:>14.3f}x" for name, t in train.items()]
    ratio_peft = train["dynlora LoRA r=8"] / train["PEFT LoRA r=8"]
    infer_ratio = infer["dynlora merged"] / infer["base model"]
    lines.append(f"dynlora / PEFT LoRA step time: {ratio_peft:.3f}x")
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
        "inference_median_s": infer,
        "merged_over_base_inference": infer_ratio,
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "step_time.json").write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(f"| {name} | {t / limit:.3f}× |" for name, t in train.items())
    body = f"""## Training step time (MiniLM-L6, batch {args.batch}×{args.seq}, CPU)

`{record["command"]}` — {env["date"]}, {env["machine"]}; torch {env["torch"]}, transformers {env["transformers"]},
peft {env["peft"]}. Interleaved, median of {args.rounds} steps each after {args.warmup} warm-up steps.

| configuration | step time / frozen limit |
|---|---|
{rows}

- dynlora LoRA / PEFT LoRA step time: **{ratio_peft:.3f}×** (target ≤ 1.00)
- merged dynlora model inference / base model inference: **{infer_ratio:.3f}×** (target: equal within noise)

Raw figures: [results/step_time.json](results/step_time.json)."""
    write_section(HERE / "RESULTS.md", "step_time", body)


if __name__ == "__main__":
    main()
