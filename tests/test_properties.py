"""Property tests (hypothesis): random layer shapes, ranks and re-allocation sequences."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from dynlora import DynamicLoRALinear, allocate
from dynlora.input_statistics import InputStatistics

FAST = settings(max_examples=40, deadline=None)


@st.composite
def layers(draw):
    d_in, d_out = draw(st.integers(2, 24)), draw(st.integers(2, 24))
    cap = draw(st.integers(1, min(d_in, d_out)))
    rank = draw(st.integers(1, cap))
    conv = draw(st.booleans())
    gate = draw(st.sampled_from([None, "mergeable", "per_example"]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    alpha = draw(st.floats(0.5, 32))
    base = Conv1D(d_out, d_in) if conv else nn.Linear(d_in, d_out)
    layer = DynamicLoRALinear(base, rank, alpha, max_rank=cap, input_adaptive=gate)
    with torch.no_grad():
        layer.lora_B.normal_()
        if layer.token_gate is not None:
            layer.token_gate.weight.normal_()
    if layer.input_norm is not None:  # statistics from a batch, then frozen (eval)
        layer.train()
        layer(torch.randn(16, d_in) * torch.rand(d_in) * 10)
        InputStatistics([layer.input_norm]).commit()
    return layer.eval()


@FAST
@given(layers(), st.lists(st.integers(0, 24), min_size=1, max_size=6))
def test_growth_and_rebase_preserve_outputs_along_any_rank_sequence(layer, ranks):
    x = torch.randn(5, layer.in_features)
    for target in ranks:
        target = min(target, layer.max_rank)
        if target < layer.rank:  # shrinking drops the weakest directions: the output may change, by design
            layer.rebase()
            layer.set_rank(target)
            continue
        before = layer(x)
        layer.set_rank(target)
        assert torch.allclose(layer(x), before, atol=1e-4, rtol=1e-4)
    before = layer(x)
    layer.rebase()
    assert torch.allclose(layer(x), before, atol=1e-4, rtol=1e-4)


@FAST
@given(layers())
def test_merge_equals_unmerged_output_unless_per_example(layer):
    x = torch.randn(4, layer.in_features)
    before = layer(x)
    if layer.token_gate is not None:
        try:
            layer.merge()
        except RuntimeError:
            return
        raise AssertionError("a per-example gate must refuse to merge")
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-4, rtol=1e-4)
    layer.unmerge()
    assert torch.allclose(layer(x), before, atol=1e-4, rtol=1e-4)


@FAST
@given(st.data())
def test_allocation_respects_budget_and_bounds(data):
    n = data.draw(st.integers(1, 10))
    costs = data.draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    mins = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    maxs = [lo + data.draw(st.integers(0, 10)) for lo in mins]
    floor = sum(c * lo for c, lo in zip(costs, mins, strict=True))
    budget = floor + data.draw(st.integers(0, 400))
    scores = data.draw(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=n, max_size=n))
    temperature = data.draw(st.floats(0.1, 10))
    ranks = allocate(scores, costs, budget, mins, maxs, temperature)
    assert sum(c * r for c, r in zip(costs, ranks, strict=True)) <= budget
    assert all(lo <= r <= hi for r, lo, hi in zip(ranks, mins, maxs, strict=True))
    assert ranks == allocate(scores, costs, budget, mins, maxs, temperature)  # deterministic


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(0, 8), min_size=2, max_size=2), st.sampled_from([None, "mergeable"]))
def test_save_load_and_peft_export_round_trip(rank, new_ranks, gate):
    import tempfile

    from conftest import batch, build, randomize_adapters
    from peft import PeftModel

    from dynlora import DynamicLoRAConfig, DynamicLoRAModel, get_dynlora_model

    model = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=rank, max_rank=8, input_adaptive=gate))
    randomize_adapters(model)
    names = list(model.lora_layers())[:2]
    model.set_ranks(dict(zip(names, new_ranks, strict=True)))
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).logits
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(f"{d}/dyn")
        with torch.no_grad():
            loaded = DynamicLoRAModel.from_pretrained(build("bert"), f"{d}/dyn")(**inputs).logits
        assert torch.allclose(loaded, expected, atol=1e-6)
        if any(r > 0 for r in model.rank_pattern().values()):
            model.export_peft(f"{d}/peft")
            with torch.no_grad():
                peft_out = PeftModel.from_pretrained(build("bert"), f"{d}/peft")(**inputs).logits
            assert torch.allclose(peft_out, expected, atol=1e-5)
