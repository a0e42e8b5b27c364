"""Dynamic LoRA in an existing transformers.Trainer script: wrap the model, add one callback, call nothing else.

    python examples/trainer_callback.py [--steps 200] [--data-dir ../shared/data/glue] [--out outputs/trainer]

The callback binds the Trainer's optimizer and step count, re-allocates ranks on schedule, saves the allocator
state in every Trainer checkpoint and restores it with ``trainer.train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from dynlora import DynamicLoRACallback, DynamicLoRAConfig, default_model_path, get_dynlora_model
from dynlora.training.data import DataError, load_glue
from dynlora.training.data.loader import collate, tokenize


class Features(torch.utils.data.Dataset):
    def __init__(self, features: list[dict]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DYNLORA_GLUE_DIR", "../shared/data/glue"),
        help="GLUE folder (default: $DYNLORA_GLUE_DIR, else ../shared/data/glue)",
    )
    parser.add_argument("--out", default="outputs/trainer")
    args = parser.parse_args()

    try:
        splits = load_glue("sst2", args.data_dir)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    train = Features(tokenize(splits["train"][: 32 * args.steps], tok, max_length=64))
    dev = Features(tokenize(splits["validation"], tok, max_length=64))

    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_dynlora_model(base, DynamicLoRAConfig(rank=8, alpha=16))  # 1. wrap the model

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.out,
            max_steps=args.steps,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            eval_strategy="no",
            save_steps=max(1, args.steps // 2),
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=train,
        data_collator=lambda features: collate(features, tok.pad_token_id),
        callbacks=[DynamicLoRACallback()],  # 2. add the callback: nothing else to call
    )
    trainer.train()
    out = trainer.predict(dev, metric_key_prefix="dev")
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions  # (logits, ...) per model
    accuracy = (logits.argmax(-1) == out.label_ids).mean()
    print(f"dev loss {out.metrics['dev_loss']:.4f}, dev accuracy {accuracy:.4f}")
    print(f"re-allocations: {len(model.allocation_events())}; ranks now {sorted(model.rank_pattern().values())}")
    model.save_pretrained(os.path.join(args.out, "adapter"))


if __name__ == "__main__":
    main()
