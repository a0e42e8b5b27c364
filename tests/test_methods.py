"""The methods behind one protocol: the same budget from the same config, and PEFT's AdaLoRA saving cleanly."""

import dataclasses
import warnings

import pytest
import torch
from conftest import tiny_bert
from safetensors.torch import load_file

from dynlora import DynamicLoRAConfig
from dynlora.training.methods import METHODS, get_method
from dynlora.training.peft_baselines import adalora_schedule

CONFIG = DynamicLoRAConfig(rank=2, target_modules=["query", "value"])


def test_adalora_layer_pruned_to_rank_zero_saves_without_a_sharding_warning(tmp_path):
    adapted = get_method("peft-adalora").wrap(tiny_bert(), CONFIG, 20)
    with torch.no_grad():
        pruned = next(p for n, p in adapted.model.named_parameters() if "lora_E" in n)
        pruned.zero_()
    adapted.load_state_dict({})  # rebuilds AdaLoRA's mask from the zeroed lora_E, as a resumed run does
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's ZeRO-3/FSDP warning does not apply to a pruned layer
        adapted.save(tmp_path)
    shapes = [t.shape for t in load_file(tmp_path / "adapter_model.safetensors").values()]
    assert any(0 in s for s in shapes)  # the layer really was saved at rank 0


def test_adalora_prunes_on_the_runs_schedule_settings():
    config = DynamicLoRAConfig(rank=2, target_modules=["query", "value"], warmup=0.2, interval=3, final=0.5)
    peft_config = get_method("peft-adalora").wrap(tiny_bert(), config, 100).model.peft_config["default"]
    assert (peft_config.tinit, peft_config.deltaT, peft_config.tfinal, peft_config.total_step) == (20, 3, 50, 100)
    steps = DynamicLoRAConfig(warmup=10, interval=5, final=90)
    assert adalora_schedule(steps, 100) == {"tinit": 10, "tfinal": 10, "deltaT": 5}


def test_adalora_on_the_default_schedule_prunes_where_it_always_did():
    """Before it read the settings, AdaLoRA ran on int(0.1 T), int(0.2 T) and int(0.05 T) (at least 1) steps."""
    for total in range(1, 3001):
        old = {"tinit": int(0.1 * total), "tfinal": int(0.2 * total), "deltaT": max(1, int(0.05 * total))}
        assert adalora_schedule(DynamicLoRAConfig(), total) == old, total


@pytest.mark.parametrize("method", ["lora", "peft-lora"])
def test_static_methods_train_as_many_parameters_as_dynamic_lora(method):
    dynamic = get_method("dynamic").wrap(tiny_bert(), CONFIG, 20).model.budget_trainable_parameters()
    assert get_method(method).wrap(tiny_bert(), CONFIG, 20).trainable_parameters() == dynamic


def test_static_lora_is_derived_from_the_dynamic_config():
    lora = get_method("lora").wrap(tiny_bert(), CONFIG, 20).model
    assert lora.dynlora_config.reallocate is False and lora.dynlora_config.input_adaptive is None
    assert lora.dynlora_config.init == "lora" and lora.engine.allocator is None
    assert all(layer.max_rank == 2 for layer in lora.lora_layers().values())


def test_a_method_records_only_the_settings_it_uses():
    changed = DynamicLoRAConfig(rank=2, target_modules=["query", "value"], temperature=3.0, init="lora")
    for name in METHODS:
        method = get_method(name)
        same = method.identity(changed) == method.identity(CONFIG)
        assert same == (name not in ("dynamic",)), name  # static LoRA and PEFT ignore the engine's settings


def test_an_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown method 'adalora'; choose one of: dynamic, lora"):
        get_method("adalora")


def _batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(1, 97, (8, 12), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_rslora_scales_by_the_square_root_of_the_rank():
    model = get_method("peft-rslora").wrap(tiny_bert(), CONFIG, 20).model
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(CONFIG.alpha / 2**0.5)


@pytest.mark.parametrize("method", ["lora", "dynamic"])
def test_dynlora_rslora_scales_as_peft_rslora_at_the_budgets_rank(method):
    config = dataclasses.replace(CONFIG, rslora=True)  # dynamic starts above the rank (start_ratio): same scale
    ours = get_method(method).wrap(tiny_bert(), config, 20).model
    peft = get_method("peft-rslora").wrap(tiny_bert(), config, 20).model
    for name, layer in ours.lora_layers().items():
        assert layer.scaling == pytest.approx(peft.base_model.model.get_submodule(name).scaling["default"])
    grown = [layer.rank > CONFIG.rank for layer in ours.lora_layers().values()]
    assert all(grown) == (method == "dynamic")


def test_loraplus_trains_b_faster_than_a():
    adapted = get_method("peft-loraplus").wrap(tiny_bert(), CONFIG, 20)
    optimizer = adapted.make_optimizer(1e-3, 0.1)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(adapted.model.named_parameters())
    a = next(p for n, p in named.items() if "lora_A" in n)
    b = next(p for n, p in named.items() if "lora_B" in n)
    assert lrs[id(b)] == pytest.approx(16 * lrs[id(a)]) and lrs[id(a)] == pytest.approx(1e-3)
    assert decay[id(a)] == decay[id(b)] == 0.1  # the run's weight decay, as for every other method
    head = [p for n, p in named.items() if ".classifier." in n and p.requires_grad]
    assert len(head) == 2 and all(lrs[id(p)] == pytest.approx(1e-3) for p in head)  # weight and bias at the base lr
    assert {id(p) for p in adapted.model.parameters() if p.requires_grad} == set(lrs)  # nothing left out


def test_eva_starts_a_along_the_layer_inputs_within_the_rank_budget():
    adapted = get_method("peft-eva").wrap(tiny_bert(), CONFIG, 20, lambda: _batches())
    a_weights = {n: p for n, p in adapted.model.named_parameters() if "lora_A" in n}
    assert sum(w.shape[0] for w in a_weights.values()) == 2 * 4  # rank 2 x 4 layers, redistributed
    for w in a_weights.values():  # rows are right-singular vectors of the inputs: orthonormal
        assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-4)
    with pytest.raises(ValueError, match="starts from the training data"):
        get_method("peft-eva").wrap(tiny_bert(), CONFIG, 20)


def test_dynamic_lora_under_loraplus_trains_b_faster_and_still_reallocates():
    config = DynamicLoRAConfig(rank=2, target_modules=["query", "value"], warmup=2, interval=2, final=6)
    adapted = get_method("dynamic").wrap(tiny_bert(), config, 8)
    optimizer = adapted.make_optimizer(1e-2, 0.1, loraplus_lr_ratio=4.0)
    lrs = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = dict(adapted.model.named_parameters())
    assert all(lrs[id(p)] == (4e-2, 0.1) for n, p in named.items() if "lora_B" in n)
    assert all(lrs[id(p)] == (1e-2, 0.1) for n, p in named.items() if "lora_A" in n)
    adapted.bind(optimizer, 8)
    for step, batch in enumerate(_batches(8), start=1):
        labels = torch.arange(8) % 2
        adapted.model(**batch, labels=labels).loss.backward()
        optimizer.step()
        adapted.after_step(step)
        optimizer.zero_grad()
    assert adapted.allocation_events() and len(set(adapted.ranks().values())) > 1  # ranks moved between layers
    assert all(torch.isfinite(p).all() for p in named.values())
