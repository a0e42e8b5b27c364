"""Mixture-of-experts LLMs (transformers 5's fused experts): experts and routers adapted, rank moved between
experts, exact merge, reload and PEFT export, Trainer resume, and no target left out without a line saying so."""

import copy
import re
import warnings

import pytest
import torch
from conftest import VOCAB, randomize_adapters
from test_decoders import greedy, prompt, run_trainer

from dynlora import DynamicLoRAConfig, DynamicLoRAModel, get_dynlora_model

SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**SIZES, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2))


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(**SIZES, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, shared_expert_intermediate_size=32)  # fmt: skip
    return Qwen2MoeForCausalLM(config)


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**SIZES, intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16)  # fmt: skip
    return Qwen3MoeForCausalLM(config)


def tiny_olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    config = OlmoeConfig(**SIZES, intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=1)
    return OlmoeForCausalLM(config)


MOE_BUILDERS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "qwen3_moe": tiny_qwen3_moe, "olmoe": tiny_olmoe}


def moe(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return MOE_BUILDERS[arch]().eval()


def kinds(model: DynamicLoRAModel) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in model.lora_layers().values():
        counts[layer.kind] = counts.get(layer.kind, 0) + 1
    return counts


@pytest.mark.parametrize("arch", sorted(MOE_BUILDERS))
def test_all_linear_adapts_every_expert_and_router_and_says_so(arch, capsys):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(frozen|match no)")  # nothing is left out
        model = get_dynlora_model(moe(arch), DynamicLoRAConfig(rank=2, target_modules="all-linear"))
    names = model.lora_layers()
    # 2 blocks x (gate_up_proj, down_proj) x 4 experts, and each block's router
    assert kinds(model)["expert"] == 16 and kinds(model)["router"] == 2
    assert "model.layers.1.mlp.experts.lora.down_proj.3" in names and "model.layers.0.mlp.gate.lora.weight.0" in names
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    model.print_trainable_parameters()
    linear = kinds(model)["linear"]
    assert capsys.readouterr().out.strip().endswith(f"|| adapted: {linear} linear layers, 16 experts, 2 routers")


@pytest.mark.parametrize("arch", sorted(MOE_BUILDERS))
def test_the_family_default_adapts_attention_and_the_experts(arch):
    model = get_dynlora_model(moe(arch), DynamicLoRAConfig(rank=2))
    assert kinds(model) == {"linear": 4, "expert": 16}  # q_proj, v_proj; gate_up_proj, down_proj of 4 experts


def test_target_entries_that_match_nothing_and_frozen_experts_are_said_not_skipped_silently():
    classic = ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]  # Mixtral's names before transformers 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_dynlora_model(moe("mixtral"), DynamicLoRAConfig(rank=2, target_modules=classic))
    said = [str(w.message) for w in caught]
    assert any(m.startswith("target_modules 'w1', 'w2', 'w3' match no adaptable layer") for m in said)
    frozen = "4 mixture-of-experts weights (model.layers.0.mlp.experts.gate_up_proj, ...) are not in target_modules"
    assert any(m.startswith(frozen) and "add down_proj, gate_up_proj or use all-linear" in m for m in said)


@pytest.mark.filterwarnings("ignore:2 mixture-of-experts weights")  # gate_up_proj, left out on purpose
def test_expert_and_router_entries_name_them_as_peft_recipes_do():
    # Qwen2-MoE's shared expert is a linear MLP: "down_proj" names its down_proj and the experts' fused one.
    model = get_dynlora_model(moe("qwen2_moe"), DynamicLoRAConfig(rank=2, target_modules=["down_proj", "gate"]))
    names = set(model.lora_layers())
    assert "model.layers.0.mlp.shared_expert.down_proj" in names
    assert {f"model.layers.0.mlp.experts.lora.down_proj.{e}" for e in range(4)} <= names
    assert "model.layers.0.mlp.gate.lora.weight.0" in names and kinds(model)["router"] == 2
    experts_only = get_dynlora_model(moe("olmoe"), DynamicLoRAConfig(rank=2, target_modules=["experts"]))
    assert kinds(experts_only) == {"expert": 16}


def test_a_router_narrower_than_the_rank_is_adapted_at_its_width_and_said():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_dynlora_model(moe("mixtral"), DynamicLoRAConfig(rank=8, target_modules="all-linear"))
    said = " | ".join(str(w.message) for w in caught)
    assert re.search(r"all-linear: 2 layer\(s\) narrower than rank 8 .*mlp\.gate\.weight \(32 -> 4\)", said)
    assert model.rank_pattern()["model.layers.0.mlp.gate.lora.weight.0"] == 4


def train(model, steps: int = 12, reroute=None):
    """A few AdamW steps on random tokens with re-allocation; ``reroute`` maps each block's expert choices."""
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.bind_optimizer(optimizer, steps)
    model.train()
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    return model.eval()


def engine_config(**overrides) -> DynamicLoRAConfig:
    return DynamicLoRAConfig(
        rank=4, target_modules="all-linear", warmup=3, interval=3, final=9, input_adaptive=None, **overrides
    )


@pytest.mark.parametrize("arch", sorted(MOE_BUILDERS))
def test_reallocation_moves_rank_between_the_experts_of_one_weight_within_the_budget(arch):
    model = train(get_dynlora_model(moe(arch), engine_config()))
    events = model.allocation_events()
    assert len(events) == 3
    experts = [events[-1]["ranks"][f"model.layers.0.mlp.experts.lora.gate_up_proj.{e}"] for e in range(4)]
    assert len(set(experts)) > 1, experts  # the experts of one fused weight end at different ranks
    assert model.engine.total_cost() <= model.engine.budget


def test_an_expert_no_token_reaches_keeps_its_importance():
    model = get_dynlora_model(moe("mixtral"), engine_config())

    def never_expert_3(module, inputs, output):  # route expert 3's tokens to expert 0
        logits, scores, indices = output
        return logits, scores, torch.where(indices == 3, torch.zeros_like(indices), indices)

    for block in model.model.model.layers:
        block.mlp.gate.register_forward_hook(never_expert_3)
    scorer = model.engine.scorer
    scorer.last_layer_score.fill_(7.0)  # scores from earlier steps
    ids = torch.randint(1, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.normal_()  # a trained adapter: every component has a sensitivity
    model(input_ids=ids, labels=ids).loss.backward()
    scorer.update(model.lora_layers())
    scores = model.importance()
    name = "model.layers.{}.mlp.experts.lora.gate_up_proj.{}"
    assert all(scores[name.format(b, 3)] == 7.0 for b in range(2))  # no gradient: no decision, kept as it was
    assert all(scores[name.format(b, e)] != 7.0 for b in range(2) for e in range(3))


@pytest.mark.parametrize("arch", sorted(MOE_BUILDERS))
def test_merge_reload_and_peft_export_compute_and_generate_as_the_trained_adapter(arch, tmp_path):
    from peft import PeftModel

    model = train(get_dynlora_model(moe(arch), engine_config()))
    randomize_adapters(model, scale=0.3)  # large enough to change what is generated
    inputs = prompt()
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = greedy(model, inputs)
    assert not torch.equal(tokens, greedy(moe(arch), inputs))

    merged = copy.deepcopy(model).merge_and_unload().eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(merged, inputs), tokens)

    model.save_pretrained(tmp_path / "ours")
    reloaded = DynamicLoRAModel.from_pretrained(moe(arch), tmp_path / "ours").eval()
    assert reloaded.rank_pattern() == model.rank_pattern()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)

    model.export_peft(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(did not match|were set but)")  # PEFT finds every tensor
        peft_model = PeftModel.from_pretrained(moe(arch), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(peft_model, inputs), tokens)


def test_trainer_checkpoints_resume_a_mixture_of_experts_run_exactly(tmp_path):
    config = dict(rank=4, target_modules="all-linear", warmup=3, interval=3, final=9)
    straight = get_dynlora_model(moe("olmoe"), DynamicLoRAConfig(**config))
    run_trainer(straight, "olmoe", tmp_path / "a")
    first = get_dynlora_model(moe("olmoe"), DynamicLoRAConfig(**config))
    run_trainer(first, "olmoe", tmp_path / "b", save_only_model=False)
    resumed = get_dynlora_model(moe("olmoe"), DynamicLoRAConfig(**config))
    run_trainer(resumed, "olmoe", tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-6"))
    assert resumed.allocation_events() == straight.allocation_events()
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert any("experts.lora" in k for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_gradient_init_starts_every_expert_along_its_own_weight_gradient():
    model = get_dynlora_model(moe("qwen3_moe"), engine_config(init="gradient", reallocate=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, steps=1)
    # Every expert got tokens in this batch, so none started at random.
    assert not [w for w in caught if "start at random" in str(w.message)]
    expert = model.lora_layers()["model.layers.0.mlp.experts.lora.gate_up_proj.0"]
    a = expert.lora_A[: expert.rank].detach()
    gram = a @ a.T
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)  # orthogonal rows
