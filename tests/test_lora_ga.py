"""init="lora-ga": both factors start from the first step's ∂L/∂W as LoRA-GA sets them, the base weight offset so
the output starts unchanged; the offset travels with the adapter (save, load, resume, export, merge, disable)."""

import json

import pytest
import torch
from conftest import VOCAB, build
from test_probe import exact_top, subspace_overlap, true_weight_gradients

from dynlora import DynamicLoRAConfig, DynamicLoRAModel, get_dynlora_model
from dynlora.probe import LORA_GA_GAMMA, lora_ga_factors


def ga_config(**overrides):
    base = dict(rank=2, max_rank=4, reallocate=False, input_adaptive=None, init="lora-ga")
    return DynamicLoRAConfig(**{**base, **overrides})


def lm_batch(step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (4, 9), generator=torch.Generator().manual_seed(100 + step))
    return {"input_ids": ids, "labels": ids}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_steps(model, steps: int, total: int = 20, inputs=lm_batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.bind_optimizer(opt, total)
    model.train()
    for step in range(1, steps + 1):
        model(**inputs(step)).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    return model.eval(), opt


def test_the_factors_are_the_gradients_singular_directions_at_lora_gas_scale():
    grad = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    a, b = lora_ga_factors(grad, 3)
    u, s, vh = torch.linalg.svd(grad)
    assert subspace_overlap(a, vh[:3]) > 0.999  # A: the top 3 right singular vectors
    assert torch.allclose(a @ a.T, torch.eye(3), atol=1e-5)
    zeta = 24**0.25 / LORA_GA_GAMMA**0.5  # B: the next 3 left ones, at zeta x their singular values
    assert torch.allclose(b.norm(dim=0), zeta * s[3:6], rtol=1e-3)
    assert subspace_overlap(b.T, u[:, 3:6].T) > 0.999
    narrow_a, narrow_b = lora_ga_factors(grad[:5], 3)  # 5 triplets: 3 for A, 2 for B, one column of B left at 0
    assert narrow_a.shape == (3, 40) and narrow_b[:, 2].abs().max() == 0 and narrow_b[:, :2].abs().min() > 0


def test_the_first_step_starts_from_the_gradient_and_leaves_the_output_where_it_was(arch):
    """BERT, GPT-2 (Conv1D: the offset is transposed into its weight), Llama and Qwen2 (v_proj: out ≠ in)."""
    model = get_dynlora_model(build(arch), ga_config())
    ids = lm_batch(1)["input_ids"]
    labels = torch.zeros(4, dtype=torch.long) if arch == "bert" else ids  # classification or next-token loss
    model.train()
    reference = true_weight_gradients(model, inputs={"input_ids": ids, "labels": labels})  # on step 1's batch

    train_steps(model, 1, inputs=lambda step: {"input_ids": ids, "labels": labels})
    for name, layer in model.lora_layers().items():
        assert subspace_overlap(layer.lora_A.detach(), exact_top(reference[name], layer.rank)) > 0.99
        assert layer.lora_B.abs().max() > 0 and torch.equal(layer.offset_B, layer.lora_B.detach())
    with model.disable_adapter():
        base = logits(model, ids)
    assert torch.allclose(logits(model, ids), base, atol=1e-5)  # W' + s·B₀A₀ = W
    if arch != "bert":  # no task head trained by the step: disabled, it is the base model itself
        assert torch.allclose(base, logits(build(arch), ids), atol=1e-5)


def test_a_lora_ga_adapter_loads_exports_merges_and_disables_to_the_same_outputs(tmp_path):
    from peft import PeftModel

    model, _ = train_steps(get_dynlora_model(build("llama"), ga_config(reallocate=True, warmup=2, interval=1)), 4)
    ids = lm_batch(9)["input_ids"]
    trained = logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "dynlora_config.json").read_text())["format_version"] == 3

    loaded = DynamicLoRAModel.from_pretrained(build("llama"), tmp_path / "adapter")  # offset applied to a fresh base
    assert torch.allclose(logits(loaded, ids), trained, atol=1e-5)
    with loaded.disable_adapter():
        assert torch.allclose(logits(loaded, ids), logits(build("llama"), ids), atol=1e-5)

    loaded.export_peft(tmp_path / "peft")
    peft = PeftModel.from_pretrained(build("llama"), str(tmp_path / "peft")).eval()
    assert torch.allclose(logits(peft, ids), trained, atol=1e-5)
    exported = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert sorted(exported.values()) == sorted(r + 3 for r in model.rank_pattern().values())  # + the offset: 1.5 x 2

    assert torch.allclose(logits(loaded.merge_and_unload(), ids), trained, atol=1e-5)


def test_a_whole_state_dict_carries_the_offset_to_a_fresh_base():
    """What a Trainer checkpoint and dynlora's own hold: the offset is restored to the base weight, once."""
    model, _ = train_steps(get_dynlora_model(build("llama"), ga_config()), 2)
    ids = lm_batch(9)["input_ids"]
    fresh = get_dynlora_model(build("llama"), ga_config())
    fresh.load_state_dict(model.state_dict())
    fresh.load_state_dict(model.state_dict())  # again: the same offset is not applied twice
    assert torch.allclose(logits(fresh.eval(), ids), logits(model, ids), atol=1e-6)


def test_lora_ga_needs_a_weight_it_can_offset():
    with pytest.raises(ValueError, match="a per-token gate would change"):
        ga_config(input_adaptive="per_example")
    from test_moe import moe

    with pytest.raises(ValueError, match="is an expert of a fused parameter; use init='gradient'"):
        get_dynlora_model(moe("mixtral"), ga_config(target_modules="all-linear"))
