"""Dynamic LoRA under TRL's SFTTrainer: the shipped SmolLM2-135M-Instruct learns to answer in one word.

    python examples/sft_trainer.py [--steps 30] [--out outputs/sft]

The model is wrapped once with get_dynlora_model, and DynamicLoRACallback is the only other line: it binds the
Trainer's optimizer, re-allocates ranks across the 210 linear layers on its schedule, and keeps the allocation in
every checkpoint (which holds the adapter, not the base model). Then the adapter generates, and so does its merge.
"""

from __future__ import annotations

import argparse
import copy

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from dynlora import DynamicLoRACallback, DynamicLoRAConfig, get_dynlora_model
from dynlora.shipped_models import decoder_model_path

REVIEWS = [
    ("a moving, wonderful film", "positive"),
    ("dull and far too long", "negative"),
    ("the cast shines in every scene", "positive"),
    ("a waste of an evening", "negative"),
    ("funny, warm and clever", "positive"),
    ("the plot makes no sense", "negative"),
]


def conversation(review: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": f"Review: {review}\nIs this review positive or negative?"}]
    return messages + ([{"role": "assistant", "content": answer}] if answer else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="outputs/sft")
    args = parser.parse_args()

    path = decoder_model_path()  # converted from the package's GGUF file on first use
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = DynamicLoRAConfig(rank=4, target_modules="all-linear")
    model = get_dynlora_model(AutoModelForCausalLM.from_pretrained(path), config)  # 1. wrap the model
    model.print_trainable_parameters()
    rows = Dataset.from_list([{"messages": conversation(r, a)} for r, a in REVIEWS * 8])
    sft = SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_steps=max(1, args.steps // 2),
        report_to=[],
        use_cpu=True,
        max_length=96,
        logging_steps=max(1, args.steps // 3),
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=sft, train_dataset=rows, processing_class=tok, callbacks=[DynamicLoRACallback()]
    )  # 2. add the callback
    trainer.train()
    print(
        f"re-allocations: {len(model.allocation_events())}; ranks now {min(model.rank_pattern().values())}-"
        f"{max(model.rank_pattern().values())} over {len(model.lora_layers())} layers"
    )

    model.eval()
    prompt = tok.apply_chat_template(
        conversation("an instant classic"), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        ours = model.generate(**prompt, max_new_tokens=6, do_sample=False)
        merged = copy.deepcopy(model).merge_and_unload().generate(**prompt, max_new_tokens=6, do_sample=False)
    answer = tok.decode(ours[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer.strip()!r}; the merged model generates the same: {torch.equal(ours, merged)}")
    model.save_pretrained(f"{args.out}/adapter")


if __name__ == "__main__":
    main()
