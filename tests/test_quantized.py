"""QLoRA: Dynamic LoRA on a bitsandbytes 4-bit (NF4) or 8-bit base, on this CPU. The adapters train in float32 and
re-allocate, the PEFT export gives PEFT the same logits on the same quantised base, and a merge into quantised
weights is refused before anything changes (dynlora merge merges on the full-precision base instead)."""

import json
import warnings

import pytest
import torch
from conftest import save_tiny_llama
from helpers import chat_file, quick, run_cli
from helpers import ok as run

from dynlora import DynamicLoRAConfig, get_dynlora_model
from dynlora.cli import main

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def llama64(tmp_path_factory):
    """bitsandbytes' CPU kernels quantise blocks of 64 inputs: a tiny Llama with 64 hidden features."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden=64)


def quantized(path: str, bits: int):
    from transformers import AutoModelForCausalLM

    from dynlora.training.base_model import quantized_loading

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' notes about its CPU kernels
        loading = quantized_loading(bits, torch.device("cpu"), None)
        return AutoModelForCausalLM.from_pretrained(path, **loading)


def batch(n: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 1000, (n, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("bits", [4, 8])
def test_adapters_train_in_float32_and_reallocate_on_a_quantised_base(llama64, bits):
    config = DynamicLoRAConfig(rank=4, target_modules="all-linear", warmup=1, interval=1, final=3)
    model = get_dynlora_model(quantized(llama64, bits), config)
    layer = next(iter(model.lora_layers().values()))
    assert type(layer.base_layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    assert layer.lora_A.dtype == torch.float32 and layer.in_features == 64
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.bind_optimizer(optimizer, 4)
    initial, losses = model.rank_pattern(), []
    model.train()
    for step in range(1, 5):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    assert [e["step"] for e in model.allocation_events()] == [1, 2, 3] and model.rank_pattern() != initial
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_the_peft_export_gives_peft_the_same_logits_on_the_same_4bit_base(llama64, tmp_path):
    from peft import PeftModel

    model = get_dynlora_model(quantized(llama64, 4), DynamicLoRAConfig(rank=4, target_modules="all-linear"))
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.normal_(std=0.05)
    model.eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        ours = model(**inputs).logits
        model.export_peft(tmp_path / "peft")
        peft = PeftModel.from_pretrained(quantized(llama64, 4), tmp_path / "peft").eval()
        theirs = peft(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_merging_into_quantised_weights_is_refused_before_anything_changes(llama64):
    model = get_dynlora_model(quantized(llama64, 4), DynamicLoRAConfig(rank=2))
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(RuntimeError, match="quantised Linear4bit: dynlora does not merge into quantised weights"):
            merge()
        assert not any(layer.merged for layer in model.lora_layers().values()) and not model.unloaded


def test_a_lora_ga_start_which_would_offset_quantised_weights_is_refused(llama64):
    with pytest.raises(ValueError, match="a quantised \\(QLoRA\\) base cannot hold exactly; use init='gradient'"):
        get_dynlora_model(quantized(llama64, 4), DynamicLoRAConfig(rank=2, init="lora-ga"))


def test_the_command_trains_on_a_4bit_base_and_merges_on_the_full_precision_one(capsys, tmp_path, llama64):
    from transformers import AutoModelForCausalLM

    train = chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = run(capsys, *quick(llama64, train, out, "--load-in-4bit"))
    assert "perplexity" in text
    assert json.loads((out / "config.json").read_text())["load_in_4bit"] is True
    evaluated = run(capsys, "eval", "--adapter", out / "adapter", "--dev-file", train, "--max-length", 64)
    trained = json.loads((out / "results.json").read_text())["metrics"]["validation"]["loss"]
    assert "(on the 4-bit base it was trained on)" in evaluated and f"loss {trained:.4f}" in evaluated
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "trained on a 4-bit base (QLoRA); it is merged into the full-precision base" in capsys.readouterr().err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # a plain float model
    assert "choose one" in run_cli(capsys, *quick(llama64, train, tmp_path / "r", "--load-in-4bit", "--load-in-8bit"))
