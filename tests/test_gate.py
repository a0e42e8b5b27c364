"""Input-feature-based adaptation: the mergeable input statistics and the per-example token gate."""

import pytest
import torch
from conftest import batch, build, randomize_adapters
from test_engine import data, engine_config, make, train
from torch import nn

from dynlora import DynamicLoRAConfig, DynamicLoRALinear, DynamicLoRAModel, get_dynlora_model
from dynlora.config import static_lora
from dynlora.input_adaptation import InputNorm
from dynlora.input_statistics import InputStatistics


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_mergeable_scale_starts_at_one_and_evens_out_feature_sizes():
    torch.manual_seed(0)
    layer = DynamicLoRALinear(nn.Linear(6, 4), rank=2, alpha=2, input_adaptive="mergeable")
    assert torch.equal(layer.input_norm.scale(), torch.ones(6))
    x = torch.randn(50, 6)
    x[:, 2] *= 100.0  # an outlier feature
    layer.train()
    layer(x)
    assert torch.equal(layer.input_norm.scale(), torch.ones(6))  # accumulated, not yet committed
    InputStatistics([layer.input_norm]).commit()
    scale = layer.input_norm.scale()
    assert scale[2] < 0.02  # the outlier is brought down to the typical size ...
    assert ((scale[[0, 1, 3, 4, 5]] - 1).abs() < 0.4).all()  # ... which the typical features keep
    rms = (x * scale).square().mean(0).sqrt()
    assert rms.max() / rms.min() < 1.5


def test_input_norm_strength_is_an_exponent_of_the_scale(tmp_path):
    x = torch.randn(50, 6)
    x[:, 2] *= 100.0
    layers = [
        DynamicLoRALinear(nn.Linear(6, 4), 2, 2, input_adaptive="mergeable", input_norm_strength=s) for s in (1.0, 0.5)
    ]
    for layer in layers:
        layer.train()
        layer(x)
        InputStatistics([layer.input_norm]).commit()
    full, half = (layer.input_norm.scale() for layer in layers)
    assert torch.allclose(half, full.sqrt())
    assert 0.05 < half[2] < 0.2  # the outlier is brought only part of the way down
    # The setting reaches every layer and survives save/load.
    model = get_dynlora_model(
        build("bert"), DynamicLoRAConfig(rank=4, input_adaptive="mergeable", input_norm_strength=0.5)
    )
    assert {m.input_norm.strength for m in model.lora_layers().values()} == {0.5}
    model.save_pretrained(tmp_path)
    reloaded = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path)
    assert {m.input_norm.strength for m in reloaded.lora_layers().values()} == {0.5}


def test_forwards_within_a_step_see_the_same_scale():
    """What gradient checkpointing's recomputation needs: a training forward does not change the next one."""
    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4))
    randomize_adapters(model)
    model.bind_optimizer(None, 10)
    model.train()
    model(**data(1))
    model.update_and_allocate(1)
    first, second = model(**data(2)).logits, model(**data(2)).logits
    assert torch.equal(first, second)


def test_statistics_fold_in_every_n_steps_with_the_time_constant_of_n_per_step_updates():
    """Between folds the scale stays put; a fold merges every token of its block, rms² ← lerp(rms², block mean,
    1 − (1 − m)^n), n the steps since the last fold (the first step folds alone)."""
    layer = DynamicLoRALinear(nn.Linear(5, 3), rank=2, alpha=2, input_adaptive="mergeable")
    norm = layer.input_norm
    statistics = InputStatistics([norm])
    layer.train()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 5, generator=g) * torch.tensor([1.0, 2.0, 30.0, 0.5, 1.0]) for _ in range(8)]
    expected, start = None, 1
    for step, x in enumerate(batches, start=1):
        layer(x)
        before = norm.scale().clone()
        statistics.commit(step, every=4)
        if step not in (1, 4, 8):
            assert torch.equal(norm.scale(), before)  # not a fold: the forwards keep their scale
            continue
        block = torch.cat(batches[start - 1 : step]).square().mean(0)  # every token since the last fold
        n = step - start + 1
        expected = block if expected is None else torch.lerp(expected, block, 1 - (1 - norm.momentum) ** n)
        torch.testing.assert_close(norm.mean_sq, expected)
        start = step + 1
    assert float(norm.block_count) == 0 and not norm.block_sum.any()  # the last step folded: nothing left over


def _observed_layers(widths: list[int], seed: int = 0) -> list[DynamicLoRALinear]:
    torch.manual_seed(seed)
    layers = [DynamicLoRALinear(nn.Linear(w, 3), rank=2, alpha=2, input_adaptive="mergeable") for w in widths]
    for layer in layers:
        layer.train()
    return layers


def _observe(layers: list[DynamicLoRALinear], step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for layer in layers:
        layer(torch.randn(6, layer.in_features, generator=g) * torch.linspace(0.5, 9.0, layer.in_features))


def test_layers_committed_together_keep_the_statistics_each_would_keep_alone():
    """Layers of one width share row tensors; the result is each layer's own EMA, whatever the grouping."""
    together, alone = _observed_layers([5, 7, 5, 7, 5]), _observed_layers([5, 7, 5, 7, 5])
    grouped = InputStatistics([m.input_norm for m in together])
    separate = [InputStatistics([m.input_norm]) for m in alone]
    assert len(grouped.groups) == 2
    for step in range(1, 8):
        _observe(together, step)
        _observe(alone, step)
        grouped.commit(step, every=3)
        for statistics in separate:
            statistics.commit(step, every=3)
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a.input_norm.mean_sq, b.input_norm.mean_sq)
        assert torch.equal(a.input_norm.scale(), b.input_norm.scale())
        assert torch.equal(a.input_norm.block_sum, b.input_norm.block_sum)  # step 7 is gathered, not folded


def test_statistics_follow_buffers_that_a_load_by_assignment_replaced():
    layers = _observed_layers([5, 5])
    statistics = InputStatistics([m.input_norm for m in layers])
    _observe(layers, 1)
    statistics.commit(1, every=3)
    fresh = _observed_layers([5, 5], seed=1)[0].input_norm.state_dict()
    layers[0].input_norm.load_state_dict(fresh, assign=True)  # its buffers are new tensors, not rows any more
    _observe(layers, 2)
    statistics.commit(2, every=3)  # not a fold: the step joins the block
    assert float(layers[0].input_norm.block_count) == 6
    _observe(layers, 3)
    statistics.commit(3, every=3)
    assert bool(layers[0].input_norm.initialized)  # the fold reached the module's own buffers
    assert not torch.equal(layers[0].input_norm.scale(), torch.ones(5))


def test_one_layers_saved_statistics_do_not_carry_the_other_layers_rows(tmp_path):
    """torch.save writes a view's whole storage: a layer's state dict must own its tensors."""
    layers = _observed_layers([64] * 50)
    statistics = InputStatistics([m.input_norm for m in layers])
    _observe(layers, 1)
    statistics.commit(1)
    torch.save(layers[0].input_norm.state_dict(), tmp_path / "grouped.pt")
    torch.save(_observed_layers([64])[0].input_norm.state_dict(), tmp_path / "alone.pt")
    grouped, alone = ((tmp_path / f"{n}.pt").stat().st_size for n in ("grouped", "alone"))
    assert grouped < 1.2 * alone  # the whole group's rows would be 50 times the data


def test_a_saved_adapter_and_its_engine_state_resume_exactly_between_two_folds(tmp_path):
    """The statistics gathered since the last fold are saved with the adapter (and in checkpoints)."""
    config = engine_config(input_adaptive="mergeable", input_norm_every=5)
    straight, opt = make(config)
    train(straight, opt, 1, 20, 20)
    first, opt1 = make(config)
    train(first, opt1, 1, 7, 20)  # steps 6-7 are gathered, not folded in
    assert float(next(iter(first.lora_layers().values())).input_norm.block_count) > 0
    first.save_pretrained(tmp_path)
    resumed = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5e-3)
    opt2.load_state_dict(opt1.state_dict())
    resumed.bind_optimizer(opt2, 20)
    resumed.engine.load_state_dict(first.engine.state_dict())
    train(resumed, opt2, 8, 20, 20)
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_training_state_written_before_statistics_were_folded_in_blocks_loads_as_an_empty_block():
    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4, input_adaptive="mergeable"))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("block_sum", "block_count"))}
    model.load_state_dict(state)  # strict: every other key must be there
    with pytest.raises(RuntimeError, match="missing"):
        model.load_state_dict({k: v for k, v in state.items() if not k.endswith("mean_sq")})


def test_layers_reading_one_input_share_its_statistics_and_a_changed_input_is_measured_again():
    """q/k/v (and gate/up) read one tensor: its reduction is made once and given to each of them."""
    first, second, subsampled = InputNorm(4), InputNorm(4), InputNorm(4, max_tokens=2)
    x = torch.randn(6, 4)
    first.observe(x)
    second.observe(x)
    assert torch.equal(first.pending_sum, second.pending_sum) and second.pending_tokens.value == 6
    subsampled.observe(x)  # another subsample of the same tensor
    assert subsampled.pending_tokens.value == 2 and torch.allclose(subsampled.pending_sum, x[::3].square().sum(0))
    x.mul_(2)  # changed in place: the same object, a new version
    second.observe(x)
    assert torch.allclose(second.pending_sum, first.pending_sum * 5)
    y = torch.randn(6, 4)
    first.observe(y)
    assert torch.allclose(first.pending_sum, (x / 2).square().sum(0) + y.square().sum(0))


def test_nonfinite_statistics_are_dropped():
    layer = DynamicLoRALinear(nn.Linear(3, 3), rank=1, alpha=1, input_adaptive="mergeable")
    layer.train()
    layer(torch.tensor([[1.0, float("inf"), 2.0]]))
    InputStatistics([layer.input_norm]).commit()
    assert not bool(layer.input_norm.initialized)
    assert torch.isfinite(layer.input_norm.scale()).all()


@pytest.mark.parametrize("mode", ["mergeable", "per_example"])
def test_engine_runs_with_the_gate_on(mode):
    model, opt = make(engine_config(input_adaptive=mode))
    train(model, opt, 1, 20, 20)
    assert len(model.allocation_events()) == 5
    assert model.engine.total_cost() <= model.engine.budget
    if mode == "per_example":
        gates = [m.token_gate.weight for m in model.lora_layers().values()]
        assert any(g.abs().sum() > 0 for g in gates)  # the gate trained
        for layer in model.lora_layers().values():  # entries beyond the active rank carry nothing
            assert opt.state[layer.token_gate.weight]["exp_avg"][layer.rank :].abs().sum() == 0


def test_mergeable_gate_merges_and_exports_exactly(tmp_path):
    from peft import PeftModel

    model, opt = make(engine_config(input_adaptive="mergeable"))
    train(model, opt, 1, 12, 20)
    model.eval()
    inputs = batch()
    expected = logits(model, inputs)
    scale = next(iter(model.lora_layers().values())).input_norm.scale()
    assert (scale - 1).abs().max() > 0.05  # the gate really rescales something
    model.export_peft(tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(build("bert"), str(tmp_path / "peft")).eval()
    assert (logits(peft_model, inputs) - expected).abs().max() < 1e-5
    model.save_pretrained(tmp_path / "dyn")
    reloaded = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path / "dyn").eval()
    assert (logits(reloaded, inputs) - expected).abs().max() < 1e-6
    assert (logits(model.merge_and_unload(), inputs) - expected).abs().max() < 1e-5


def test_per_example_gate_starts_as_identity_and_is_not_mergeable(tmp_path):
    plain = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4, input_adaptive=None))
    gated = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4, input_adaptive="per_example"))
    randomize_adapters(plain)
    randomize_adapters(gated)
    inputs = batch()
    assert torch.allclose(logits(plain, inputs), logits(gated, inputs), atol=1e-6)  # w = 0, b = 0: g = 1
    with torch.no_grad():
        for layer in gated.lora_layers().values():
            layer.token_gate.weight.normal_()
    assert (logits(plain, inputs) - logits(gated, inputs)).abs().max() > 1e-4
    gated.save_pretrained(tmp_path)
    reloaded = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path)
    assert torch.allclose(logits(reloaded, inputs), logits(gated, inputs), atol=1e-6)
    with pytest.raises(RuntimeError, match="per_example"):
        gated.export_peft(tmp_path / "peft")
    with pytest.raises(RuntimeError, match="per_example"):
        gated.merge_and_unload()


def test_per_example_gate_survives_rebase_and_growth_exactly():
    torch.manual_seed(0)
    layer = DynamicLoRALinear(nn.Linear(10, 12), rank=4, alpha=4, max_rank=8, input_adaptive="per_example")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.token_gate.weight.normal_()
        layer.token_gate.bias.fill_(0.3)
    x = torch.randn(5, 10)
    before = layer(x)
    layer.rebase()
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.set_rank(7)
    assert torch.allclose(layer(x), before, atol=1e-5)


def test_input_adaptation_is_off_by_default_and_a_bad_mode_or_a_setting_of_the_mode_that_is_off_is_refused():
    model = get_dynlora_model(build("bert"), DynamicLoRAConfig())
    assert all(m.input_norm is None and m.token_gate is None for m in model.lora_layers().values())
    with pytest.raises(ValueError, match="input_norm_every only tunes the mergeable input adaptation, which is off"):
        DynamicLoRAConfig(input_norm_every=5)
    with pytest.raises(ValueError, match="--input-adaptive mergeable"):
        DynamicLoRAConfig(input_adaptive="per_example", input_norm_strength=0.5)
    assert static_lora(DynamicLoRAConfig(input_adaptive="mergeable", input_norm_every=5)).input_adaptive is None
    with pytest.raises(ValueError, match="input_adaptive"):
        DynamicLoRAConfig(input_adaptive="sometimes")
    for bad in (0.0, 1.5, True, "half"):
        with pytest.raises(ValueError, match="input_norm_strength must be in"):
            DynamicLoRAConfig(input_norm_strength=bad)
