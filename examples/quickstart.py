"""Quickstart: train Dynamic LoRA on the embedded MiniLM-L6 on SST-2 (ranks re-allocated across layers by
importance while it trains), then save, export a PEFT adapter and merge, printing what changed at each stage.

    python examples/quickstart.py [--steps 60] [--data-dir ../shared/data/glue] [--out outputs/quickstart]

The GLUE folder comes from --data-dir, else $DYNLORA_GLUE_DIR, else ../shared/data/glue (this checkout's layout).
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dynlora import DynamicLoRAConfig, default_model_path, get_dynlora_model
from dynlora.training.data import DataError, load_glue


@torch.no_grad()
def accuracy(model, tok, data, batch_size=64) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        texts, labels = zip(*data[i : i + batch_size], strict=True)
        enc = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        correct += (model(**enc).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DYNLORA_GLUE_DIR", "../shared/data/glue"),
        help="GLUE folder (default: $DYNLORA_GLUE_DIR, else ../shared/data/glue)",
    )
    parser.add_argument("--out", default="outputs/quickstart")
    args = parser.parse_args()

    random.seed(0)
    torch.manual_seed(0)
    try:
        splits = load_glue("sst2", args.data_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    train = [(e.text, e.label) for e in splits["train"]]
    dev = [(e.text, e.label) for e in splits["validation"]]
    random.shuffle(train)

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    # Every query/value projection starts at rank 8 (the budget of a static LoRA r=8) and may grow to 16.
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=8, alpha=16, max_rank=16))
    print(f"model: MiniLM-L6 from {path}")
    print(
        f"adapted layers: {len(model.lora_layers())}, trainable parameters: {model.trainable_parameters():,} at the "
        f"start, pruned to at most {model.budget_trainable_parameters():,} while training"
    )
    print(f"dev accuracy before training: {accuracy(model, tok, dev):.3f}")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    model.bind_optimizer(optimizer, total_steps=args.steps)  # once: optimizer state follows every rank change
    model.train()
    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        chunk = train[(step * args.batch_size) % len(train) :][: args.batch_size]
        texts, labels = zip(*chunk, strict=True)
        enc = tok(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        model.update_and_allocate(step + 1)  # score layers; re-allocate ranks on the schedule
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"dev accuracy after {args.steps} steps: {accuracy(model, tok, dev):.3f}")

    history = model.allocation_events()
    print(f"ranks re-allocated {len(history)} times; final ranks by layer (query, value):")
    ranks = model.rank_pattern()
    for layer in range(6):
        prefix = f"bert.encoder.layer.{layer}.attention.self."
        print(f"  layer {layer}: query {ranks[prefix + 'query']:>2}, value {ranks[prefix + 'value']:>2}")
    print(f"adapter parameters used: {model.engine.total_cost():,} of a budget of {model.engine.budget:,}")

    out = Path(args.out)
    model.save_pretrained(out / "adapter")
    model.export_peft(out / "peft")
    print(f"saved the adapter to {out / 'adapter'} and a PEFT LoRA adapter to {out / 'peft'}")
    merged = model.merge_and_unload()
    print(f"merged into a plain {type(merged).__name__}: dev accuracy {accuracy(merged, tok, dev):.3f}")


if __name__ == "__main__":
    main()
