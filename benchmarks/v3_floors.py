"""The untrained model's floors for protocol v3's report (benchmarks/v3_report.py --floors).

- SST-2: the majority-class rate of the dev set, and the zero-shot accuracy of SmolLM2-135M-Instruct with two
  standard prompts (dynlora's instruction, and the review first with "Answer with one word."), each scored by the
  answer word's first token after the prompt, lower case alone and with its capitalised form added (log-sum-exp):
  the floor is the best of them, so that no prompt of ours makes the trained methods look better than they are.
- SST-2 to a classifier (a new head, which starts at chance): the majority-class rate of the dev set.
- Code corpus: the untrained model's loss on the test documents, its per-block predictions kept as the run
  ``untrained`` (``stdlib/untrained/seed0.predictions.jsonl``) so that its difference to a method has an interval too.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from v3 import metric

from dynlora.training.base_model import load_causal_lm, quiet_transformers
from dynlora.training.data import load_glue
from dynlora.training.data.loader import collate

HERE = Path(__file__).resolve().parent
PROMPTS = {
    "dynlora's instruction": "Is the sentiment of this movie review positive or negative?\nReview: {text}",
    "review first": "Review: {text}\nIs this movie review positive or negative? Answer with one word.",
}
ANSWERS = ("negative", "positive")


@torch.no_grad()
def zero_shot(model, tok, prompt: str, examples: list, batch_size: int = 16) -> dict[str, float]:
    """Accuracy × 100 of the untrained ``model`` with ``prompt``: first token of the lower-case answer, and with the
    capitalised one's probability added."""
    first = {
        case: [tok(f(a), add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
        for case, f in (("lower", str), ("capitalised", str.capitalize))
    }
    right = {"lower": 0, "both": 0}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [
            tok.apply_chat_template([{"role": "user", "content": prompt.format(text=e.text)}], tokenize=False,
                                    add_generation_prompt=True)
            for e in chunk
        ]  # fmt: skip
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        batch = collate([{"input_ids": i, "attention_mask": [1] * len(i)} for i in ids], tok.pad_token_id)
        logits = model(**batch).logits[torch.arange(len(ids)), torch.tensor([len(i) - 1 for i in ids])]
        logprobs = logits.float().log_softmax(-1)
        lower = logprobs[:, first["lower"]]
        both = torch.logaddexp(lower, logprobs[:, first["capitalised"]])
        gold = torch.tensor([int(e.label) for e in chunk])
        right["lower"] += int((lower.argmax(-1) == gold).sum())
        right["both"] += int((both.argmax(-1) == gold).sum())
    return {case: 100 * n / len(examples) for case, n in right.items()}


def measure(table: str, plan: dict) -> dict:
    quiet_transformers()
    if metric(plan, table) == "accuracy":
        dev = load_glue(plan["tables"][table]["train"]["task"], HERE.parent.parent / "shared" / "data" / "glue")
        dev = dev["validation"]
        majority = 100 * max(sum(int(e.label) == k for e in dev) for k in (0, 1)) / len(dev)
        if plan["tables"][table]["train"].get("objective") == "classify":
            return {"majority": majority, "floor": majority, "summary": f"majority class {majority:.2f} %"}
        base = load_causal_lm(plan["base"]["model"])
        prompts = {name: zero_shot(base.model.eval(), base.tokenizer, p, dev) for name, p in PROMPTS.items()}
        best = max((v, f"{name}, {case}") for name, cases in prompts.items() for case, v in cases.items())
        cells = "; ".join(f"{name}: {c['lower']:.2f} (lower case), {c['both']:.2f} (both cases)"
                          for name, c in prompts.items())  # fmt: skip
        summary = f"majority class {majority:.2f} %; zero-shot {cells}; the floor is the best, {best[0]:.2f} %"
        return {"majority": majority, "zero_shot": prompts, "floor": best[0], "summary": summary}
    target = HERE / "results" / "v3" / table / "untrained" / "seed0.predictions.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    report = plan["tables"][table]["report"]
    command = [sys.executable, "-m", "dynlora.cli", "eval", "--model", plan["base"]["model"], *report]
    printed = subprocess.run([*command, "--predictions", str(target)], check=True, capture_output=True, text=True)
    loss = float(printed.stdout.split("loss ")[1].split(",")[0])
    return {"loss": loss, "summary": f"test loss {loss:.4f} nats per token (its difference to Dynamic LoRA below)"}
