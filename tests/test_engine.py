"""The Dynamic LoRA engine driven by a real training loop: scores, re-allocation, optimizer state, resume."""

import pytest
import torch
from conftest import VOCAB, build

from dynlora import DynamicLoRAConfig, DynamicLoRAModel, get_dynlora_model
from dynlora.importance import SCORERS
from dynlora.optim_state import rebase_state

# Every linear layer of the encoder blocks (not the pooler): 6 per block.
ALL_LINEAR = r".*layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)"


def engine_config(**overrides):
    # Start at the budget, so a test reads re-allocation alone; the over-parameterised start has tests of its own.
    base = dict(target_modules=ALL_LINEAR, rank=4, max_rank=8, alpha=8, warmup=4, interval=3, final=16, start_ratio=1)
    return DynamicLoRAConfig(**{**base, **overrides})


def data(step: int, n: int = 8, length: int = 10):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()  # a learnable rule, so gradients carry signal
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make(config=None, seed=0):
    model = get_dynlora_model(build("bert", seed), config or engine_config())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    return model, optimizer


def train(model, optimizer, start, stop, total, check=None):
    model.bind_optimizer(optimizer, total) if start == 1 else None
    model.train()
    for step in range(start, stop + 1):
        model(**data(step)).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
        if check:
            check(model, step)


def test_budget_and_bounds_hold_at_every_step_and_ranks_move():
    model, opt = make()
    budget = model.engine.budget
    initial = model.rank_pattern()

    def check(m, step):
        assert m.engine.total_cost() <= budget
        assert all(1 <= r <= 8 for r in m.rank_pattern().values())

    train(model, opt, 1, 20, 20, check)
    history = model.allocation_events()
    assert [h["step"] for h in history] == [4, 7, 10, 13, 16]
    assert model.rank_pattern() != initial  # the allocation moved away from uniform
    assert len(set(model.rank_pattern().values())) > 1
    scores = model.importance()
    assert set(scores) == set(initial) and all(s >= 0 for s in scores.values()) and max(scores.values()) > 0


@pytest.mark.parametrize("scorer", ["sensitivity", "gradient", "update_norm"])
def test_every_scorer_drives_an_allocation(scorer):
    model, opt = make(engine_config(importance=scorer))
    train(model, opt, 1, 10, 20)
    assert model.allocation_events() and model.engine.total_cost() <= model.engine.budget
    assert all(torch.isfinite(torch.tensor(list(model.importance().values()))))


@pytest.mark.parametrize("scorer", ["sensitivity", "gradient", "update_norm"])
def test_the_shape_batched_scorer_gives_the_per_layer_scores(scorer):
    """On an accelerator the layers of one shape are scored together at full capacity (importance.py)."""
    model, opt = make(engine_config(importance=scorer, min_rank=0))
    train(model, opt, 1, 8, 20)
    layers = model.lora_layers()
    first, second = list(layers)[:2]
    layers[first].set_rank(0)
    model(**data(99)).loss.backward()
    layers[second].lora_B.grad = None  # a layer that took no part in this step
    assert len(set(model.rank_pattern().values())) >= 3  # ranks differ within each shape
    one, batched = (SCORERS[scorer](layers, 0.85, 0.85, batched=b) for b in (False, True))
    for _ in range(2):
        one.update(layers)
        batched.update(layers)
    assert one.mean.abs().sum() > 0
    for state in ("mean", "unc", "last_layer_score"):
        torch.testing.assert_close(getattr(batched, state), getattr(one, state), rtol=1e-5, atol=1e-9)


def test_max_rank_change_moves_every_layer_at_most_that_far_per_reallocation():
    model, opt = make(engine_config(max_rank_change=1))
    budget, ranks = model.engine.budget, [model.rank_pattern()]

    def check(m, step):
        assert m.engine.total_cost() <= budget
        ranks.append(m.rank_pattern())

    train(model, opt, 1, 20, 20, check)
    moves = [max(abs(after[n] - before[n]) for n in after) for before, after in zip(ranks, ranks[1:], strict=False)]
    assert max(moves) == 1  # it did move, never by more than one rank at a time
    unbounded, opt = make()
    train(unbounded, opt, 1, 4, 20)  # the same first decision without the bound jumps further
    assert max(abs(r - 4) for r in unbounded.rank_pattern().values()) > 1


def test_an_over_parameterised_start_is_pruned_to_the_budget_along_a_cubic_schedule():
    model, opt = make(engine_config(start_ratio=1.5))
    engine, schedule_costs = model.engine, []
    assert set(model.rank_pattern().values()) == {6}  # round(1.5 x 4), within the capacity of 8
    assert engine.start_budget == engine.total_cost() == 6 * engine.budget // 4
    assert {m.scaling for m in model.lora_layers().values()} == {8 / 4}  # the scale is the budget's rank's

    def check(m, step):
        if m.engine.schedule.is_reallocation(step):
            planned = m.engine.allocator.budget_at(m.engine.schedule.progress(step))
            assert m.engine.total_cost() <= planned
            schedule_costs.append((step, planned, m.engine.total_cost()))

    train(model, opt, 1, 20, 20, check)
    planned = [p for _, p, _ in schedule_costs]
    assert [s for s, _, _ in schedule_costs] == [4, 7, 10, 13, 16]
    # P(t) = P + (P0 - P)(1 - p)^3 with p = 0, 1/4, ..., 1: it starts at P0 and meets the budget at final.
    p0, p = engine.start_budget, engine.budget
    assert planned == [p + int((p0 - p) * (1 - k / 4) ** 3) for k in range(5)]
    assert planned[0] == p0 and planned[-1] == p and engine.total_cost() <= p
    assert all(later <= earlier for earlier, later in zip(planned, planned[1:], strict=False))


def test_a_step_limit_too_tight_to_prune_in_time_is_held_and_said(recwarn):
    model, opt = make(engine_config(start_ratio=2.0, max_rank_change=1, final=7))
    train(model, opt, 1, 20, 20)
    assert min(model.rank_pattern().values()) >= 8 - 2 and model.engine.total_cost() > model.engine.budget
    assert any("max_rank_change=1 shrinks layers too slowly" in str(w.message) for w in recwarn)


def test_unknown_scorer_and_impossible_budget_are_clear_errors():
    with pytest.raises(ValueError, match="unknown importance scorer"):
        make(engine_config(importance="magic"))
    with pytest.raises(ValueError, match="min_rank"):
        make(engine_config(budget=100, min_rank=1))
    with pytest.raises(RuntimeError, match="bind the optimizer"):
        make()[0].update_and_allocate(1)
    with pytest.raises(ValueError, match="start_ratio must be a number >= 1"):
        engine_config(start_ratio=0.5)
    engine_config(start_ratio=2.5, reallocate=False)  # an engine setting: static LoRA ignores it


def test_the_default_starts_half_above_the_budget_and_a_start_beyond_capacity_stops_at_it():
    assert DynamicLoRAConfig().start_ratio == 1.5
    model, _ = make(engine_config(start_ratio=DynamicLoRAConfig().start_ratio))
    assert set(model.rank_pattern().values()) == {6}
    capped, _ = make(engine_config(start_ratio=2.5))  # round(2.5 x 4) = 10 components, above max_rank 8
    assert set(capped.rank_pattern().values()) == {8}
    assert capped.engine.start_budget == 2 * capped.engine.budget


def test_growth_leaves_outputs_unchanged_and_shrink_changes_little():
    model, opt = make()
    train(model, opt, 1, 3, 20)  # before the first re-allocation: B is non-zero now
    model.eval()
    batch = {k: v for k, v in data(0).items() if k != "labels"}
    with torch.no_grad():
        before = model(**batch).logits
        model.engine.resize({n: 6 for n in model.lora_layers()})  # grow every layer 4 -> 6
        grown = model(**batch).logits
    assert (grown - before).abs().max() < 1e-6


def test_optimizer_state_follows_rank_changes():
    model, opt = make()
    train(model, opt, 1, 3, 20)
    name, layer = next(iter(model.lora_layers().items()))
    state_a = opt.state[layer.lora_A]
    m_before = state_a["exp_avg"][:4].clone()
    v_before_mean = state_a["exp_avg_sq"][:4].mean()

    # Grow: new rows start with zero first moment and the layer's mean second moment; old rows untouched.
    model.engine.resize({**model.rank_pattern(), name: 6})
    assert torch.equal(state_a["exp_avg"][:4], m_before)
    assert state_a["exp_avg"][4:6].abs().sum() == 0
    assert torch.allclose(state_a["exp_avg_sq"][4:6], v_before_mean.expand(2, state_a["exp_avg_sq"].shape[1]))
    # Shrink: re-based, state mapped into the new basis, dropped rows gone with their parameters' rows.
    model.engine.resize({**model.rank_pattern(), name: 2})
    assert layer.rank == 2 and state_a["exp_avg"].shape == layer.lora_A.shape == (2, layer.in_features)
    assert opt.state[layer.lora_B]["exp_avg_sq"].shape == layer.lora_B.shape == (layer.out_features, 2)


def test_factors_store_the_active_rank_and_their_optimizer_state_follows_every_reallocation():
    model, opt = make()

    def check(m, step):
        for layer in m.lora_layers().values():
            assert layer.lora_A.shape[0] == layer.rank == layer.lora_B.shape[1]
            for p in (layer.lora_A, layer.lora_B):
                assert all(v.shape == p.shape for v in opt.state[p].values() if v.dim())

    train(model, opt, 1, 20, 20, check)
    assert len(set(model.rank_pattern().values())) > 1


def test_a_loss_the_training_loop_keeps_across_a_reallocation_does_not_break_the_next_backward():
    """A loop that holds on to its last loss keeps that step's graph, and with it autograd's record of each
    parameter's shape, alive while the re-allocation resizes the parameters."""
    model, opt = make()
    model.bind_optimizer(opt, 20)
    model.train()
    for step in range(1, 9):
        loss = model(**data(step)).loss
        loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad(set_to_none=False)  # gradients kept as zero tensors, resized with their parameters
    assert model.allocation_events() and loss.grad_fn is not None


def test_under_torch_distributed_the_factors_keep_their_capacity_and_train_the_same(monkeypatch):
    """DDP fixes parameter shapes when it wraps a model: launched as one of several processes, the factors store
    the whole capacity and the engine slices them, to the same result."""
    compact, opt = make()
    train(compact, opt, 1, 20, 20)
    monkeypatch.setenv("WORLD_SIZE", "2")
    fixed, opt2 = make()
    shapes = {n: (m.lora_A.shape, m.lora_B.shape) for n, m in fixed.lora_layers().items()}
    train(fixed, opt2, 1, 20, 20)

    assert {n: (m.lora_A.shape, m.lora_B.shape) for n, m in fixed.lora_layers().items()} == shapes
    assert all(m.lora_A.shape[0] == 8 for m in fixed.lora_layers().values())
    assert [(e["step"], e["ranks"]) for e in fixed.allocation_events()] == [
        (e["step"], e["ranks"]) for e in compact.allocation_events()
    ]
    a, b = compact.adapter_state_dict(), fixed.adapter_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_a_checkpoint_written_at_the_whole_capacity_resumes_exactly_in_the_compact_layout(monkeypatch):
    """As a Trainer resume does it: the state dict, then the optimizer's state, then the engine's ranks."""
    straight, opt = make()
    train(straight, opt, 1, 20, 20)
    monkeypatch.setenv("WORLD_SIZE", "2")
    first, opt1 = make()
    train(first, opt1, 1, 8, 20)  # past two re-allocations
    saved = {"weights": first.state_dict(), "optimizer": opt1.state_dict(), "engine": first.engine_state_dict()}
    monkeypatch.delenv("WORLD_SIZE")

    resumed, opt2 = make()
    resumed.bind_optimizer(opt2, 20)
    resumed.load_state_dict(saved["weights"])
    opt2.load_state_dict(saved["optimizer"])
    resumed.load_engine_state_dict(saved["engine"], restore_ranks=True)
    assert all(m.lora_A.shape[0] == m.rank for m in resumed.lora_layers().values())
    train(resumed, opt2, 9, 20, 20)

    assert [e["ranks"] for e in resumed.allocation_events()] == [e["ranks"] for e in straight.allocation_events()]
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_optimizer_state_that_cannot_follow_a_resize_is_dropped_for_the_optimizer_to_start_again():
    model, opt = make()
    train(model, opt, 1, 2, 20)
    name, layer = next(iter(model.lora_layers().items()))
    # A quantised optimizer's state (as bitsandbytes' 8-bit AdamW keeps): codes per element, scales per block.
    opt.state[layer.lora_A] = {"state1": torch.zeros(layer.lora_A.shape, dtype=torch.uint8), "absmax1": torch.ones(3)}
    model.set_ranks({name: 6})
    assert opt.state[layer.lora_A] == {}
    assert opt.state[layer.lora_B]["exp_avg"].shape == layer.lora_B.shape == (layer.out_features, 6)


def test_rebase_maps_first_moments_exactly():
    model, opt = make()
    train(model, opt, 1, 3, 20)
    layer = next(iter(model.lora_layers().values()))
    ma = opt.state[layer.lora_A]["exp_avg"][:4].clone()
    mb = opt.state[layer.lora_B]["exp_avg"][:, :4].clone()
    t, t_inv = layer.rebase()
    rebase_state(opt, layer, t, t_inv)
    assert torch.allclose(opt.state[layer.lora_A]["exp_avg"][:4], t_inv.T @ ma, atol=1e-6)
    assert torch.allclose(opt.state[layer.lora_B]["exp_avg"][:, :4], mb @ t.T, atol=1e-6)


def test_same_seed_same_decisions_and_weights():
    runs = []
    for _ in range(2):
        model, opt = make()
        train(model, opt, 1, 18, 20)
        runs.append((model.allocation_events(), model.adapter_state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


@pytest.mark.parametrize(
    "written_at_capacity, start_ratio",
    [(False, 1.0), (True, 1.0), (False, 1.5)],
    ids=["compact", "optimizer-state-at-capacity", "over-parameterised"],
)
def test_resume_makes_the_same_decisions_as_an_uninterrupted_run(
    tmp_path, monkeypatch, written_at_capacity, start_ratio
):
    straight, opt = make(engine_config(start_ratio=start_ratio))
    train(straight, opt, 1, 20, 20)

    if written_at_capacity:  # as under torch.distributed, or by a dynlora that stored the whole capacity
        monkeypatch.setenv("WORLD_SIZE", "2")
    first, opt1 = make(engine_config(start_ratio=start_ratio))
    train(first, opt1, 1, 8, 20)  # past two re-allocations
    first.save_pretrained(tmp_path)
    torch.save({"optimizer": opt1.state_dict(), "allocator": first.engine.state_dict()}, tmp_path / "state.pt")
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    resumed = DynamicLoRAModel.from_pretrained(build("bert"), tmp_path)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5e-3)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    opt2.load_state_dict(saved["optimizer"])
    resumed.bind_optimizer(opt2, 20)
    resumed.engine.load_state_dict(saved["allocator"])
    train(resumed, opt2, 9, 20, 20)

    assert [(e["step"], e["ranks"]) for e in resumed.allocation_events()] == [
        (e["step"], e["ranks"]) for e in straight.allocation_events()
    ]
    if not written_at_capacity:  # the same layout throughout: the same numbers
        assert resumed.allocation_events() == straight.allocation_events()
    a, b = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_allocator_state_mismatch_is_an_error():
    model, opt = make()
    train(model, opt, 1, 8, 20)
    state = model.engine.state_dict()
    fresh, _ = make()
    with pytest.raises(ValueError, match="current ranks"):
        fresh.engine.load_state_dict(state)
    over, _ = make(engine_config(start_ratio=1.5))
    with pytest.raises(ValueError, match="start_budget"):
        over.engine.load_state_dict({**over.engine.state_dict(), "start_budget": state["budget"]})


def test_engine_state_from_before_the_over_parameterised_start_loads_as_starting_at_the_budget():
    model, opt = make()
    train(model, opt, 1, 8, 20)
    state = model.engine.state_dict()
    older = {k: v for k, v in state.items() if k != "start_budget"} | {"format_version": 2}
    model.engine.load_state_dict(older)
    assert model.engine.state_dict()["start_budget"] == state["budget"] == model.engine.start_budget


def test_a_schedule_that_never_prunes_the_start_says_so_and_the_default_one_does_not(recwarn):
    model, opt = make(engine_config(start_ratio=1.5, warmup=0, interval=1, final=0))
    model.bind_optimizer(opt, 20)  # a schedule whose only re-allocation would be at step 0, before any step
    assert any("never pruned to the budget" in str(w.message) for w in recwarn)
    recwarn.clear()
    model, opt = make(engine_config(start_ratio=1.5, warmup=0.1, interval=0.05, final=0.8))
    model.bind_optimizer(opt, 1)  # the default fractions: even a 1-step run re-allocates at step 1, to the budget
    assert not any("never pruned" in str(w.message) for w in recwarn)


def test_a_state_saved_at_another_start_is_refused_saying_which_start_ratio_to_build_with():
    model, opt = make()  # start_ratio 1: as every run saved before 1.5 became the default
    train(model, opt, 1, 8, 20)
    default, _ = make(engine_config(start_ratio=DynamicLoRAConfig().start_ratio))
    with pytest.raises(ValueError, match=r"started at 1\.00x the budget, this model at 1\.50x; build the model with"):
        default.engine.load_state_dict(model.engine.state_dict(), restore_ranks=True)


def test_missing_and_nonfinite_gradients_are_skipped():
    model, opt = make()
    model.bind_optimizer(opt, 20)
    model.update_and_allocate(1)  # no backward yet: no gradients anywhere
    assert max(model.importance().values()) == 0
    model(**data(1)).loss.backward()
    next(iter(model.lora_layers().values())).lora_B.grad[0, 0] = float("nan")
    model.update_and_allocate(2)
    assert model.engine.scorer.skipped_nonfinite == 1
    assert max(model.importance().values()) == 0


def test_static_lora_has_no_engine():
    model, opt = make(engine_config(reallocate=False))
    model.bind_optimizer(opt, 10)
    assert model.engine.allocator is None and model.importance() == {}
    assert model.update_and_allocate(5) is False
    assert all(layer.max_rank == 8 for layer in model.lora_layers().values())  # explicit max_rank kept
    static = get_dynlora_model(build("bert"), DynamicLoRAConfig(rank=4, reallocate=False))
    assert all(layer.max_rank == 4 for layer in static.lora_layers().values())


def test_gradient_checkpointing_gives_the_same_decisions():
    histories = []
    for checkpointing in (False, True):
        model, opt = make()
        if checkpointing:
            model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        train(model, opt, 1, 17, 20)
        histories.append(model.allocation_events())
    assert [h["ranks"] for h in histories[0]] == [h["ranks"] for h in histories[1]]
