"""The allocation rule and the schedule, as pure functions."""

import random

import pytest

from dynlora import DynamicLoRAConfig, allocate
from dynlora.allocator import Schedule


def cost(ranks, costs):
    return sum(r * c for r, c in zip(ranks, costs, strict=True))


@pytest.mark.parametrize("seed", range(20))
def test_budget_min_max_hold_for_random_inputs(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 12)
    costs = [rng.choice([64, 96, 128, 640]) for _ in range(n)]
    mins = [rng.randint(0, 2) for _ in range(n)]
    maxs = [lo + rng.randint(0, 14) for lo in mins]
    floor = cost(mins, costs)
    budget = floor + rng.randint(0, cost(maxs, costs) - floor + 500)
    scores = [rng.choice([0.0, rng.random(), rng.random() * 1e-6, float("nan")]) for _ in range(n)]
    ranks = allocate(scores, costs, budget, mins, maxs, temperature=rng.choice([0.5, 1.0, 3.0]))
    assert cost(ranks, costs) <= budget
    assert all(lo <= r <= hi for r, lo, hi in zip(ranks, mins, maxs, strict=True))
    # The budget is spent as far as the integer ranks allow: no layer below max could take one more rank.
    left = budget - cost(ranks, costs)
    assert all(r == hi or c > left for r, hi, c in zip(ranks, maxs, costs, strict=True))


def test_equal_scores_give_the_static_lora_allocation():
    assert allocate([1.0] * 6, [768] * 6, 6 * 8 * 768, [1] * 6, [16] * 6) == [8] * 6
    assert allocate([0.0] * 4, [10] * 4, 40, [0] * 4, [4] * 4) == [1] * 4  # no signal: uniform


def test_shares_follow_scores_and_are_scale_free():
    scores = [1.0, 2.0, 4.0, 1.0]
    ranks = allocate(scores, [1] * 4, 32, [1] * 4, [32] * 4)
    assert ranks == [4, 8, 16, 4]
    assert allocate([s * 1e-9 for s in scores], [1] * 4, 32, [1] * 4, [32] * 4) == ranks
    assert allocate([s * 1e9 for s in scores], [1] * 4, 32, [1] * 4, [32] * 4) == ranks


def test_temperature_flattens_or_sharpens():
    scores = [1.0, 4.0]
    assert allocate(scores, [1, 1], 20, [0, 0], [20, 20], temperature=1.0) == [4, 16]
    assert allocate(scores, [1, 1], 20, [0, 0], [20, 20], temperature=1000.0) == [10, 10]
    assert allocate(scores, [1, 1], 20, [0, 0], [20, 20], temperature=0.1) == [0, 20]


def test_max_rank_caps_and_surplus_goes_elsewhere():
    assert allocate([100.0, 1.0, 1.0], [1, 1, 1], 24, [1, 1, 1], [8, 16, 16]) == [8, 8, 8]


def test_deterministic_and_ties_go_to_earlier_layers():
    a = allocate([1.0, 1.0, 1.0], [1, 1, 1], 10, [0, 0, 0], [10, 10, 10])
    assert a == allocate([1.0, 1.0, 1.0], [1, 1, 1], 10, [0, 0, 0], [10, 10, 10]) == [4, 3, 3]


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="below"):
        allocate([1.0, 1.0], [100, 100], 150, [1, 1], [4, 4])


def test_schedule_from_fractions_and_steps():
    cfg = DynamicLoRAConfig(warmup=0.1, interval=0.1, final=0.5)
    s = Schedule.resolve(cfg, 100)
    assert (s.warmup, s.interval, s.final) == (10, 10, 50)
    assert [t for t in range(1, 101) if s.is_reallocation(t)] == [10, 20, 30, 40, 50]
    s = Schedule.resolve(DynamicLoRAConfig(warmup=3, interval=4, final=12), 1000)
    assert [t for t in range(1, 1001) if s.is_reallocation(t)] == [3, 7, 11]
    # An over-parameterised start's budget falls over the re-allocations' span: whole at 3, met at 11, not at 12.
    assert s.last == 11 and [s.progress(t) for t in (1, 3, 7, 11, 12)] == [0.0, 0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize(
    ("warmup", "interval", "final", "total"), [(10, 10, 50, 100), (0, 7, 60, 80), (30, 50, 900, 1000)]
)
def test_importance_is_scored_on_the_window_before_each_reallocation_and_never_after_the_last(
    warmup, interval, final, total
):
    s = Schedule.resolve(DynamicLoRAConfig(warmup=warmup, interval=interval, final=final), total)
    assert 0.85**s.window <= 0.01 < 0.85 ** (s.window - 1)  # the default betas: 29 steps
    reallocations = [t for t in range(1, total + 1) if s.is_reallocation(t)]
    scored = [t for t in range(1, total + 1) if s.is_scored(t)]
    assert scored == [t for t in range(1, total + 1) if any(0 <= r - t < s.window for r in reallocations)]
    assert set(reallocations) <= set(scored) and max(scored) == reallocations[-1]


def test_windowed_scores_decide_as_scoring_every_step():
    """The EMA forgets the steps before the window to within 1 %: same scores at each re-allocation."""
    rng = random.Random(0)
    raws = [[rng.uniform(0.5, 2.0) * (1 + layer) for layer in range(3)] for _ in range(200)]
    s = Schedule.resolve(DynamicLoRAConfig(warmup=40, interval=30, final=160), 200)

    def ema(steps):
        mean = [0.0, 0.0, 0.0]
        for t in steps:
            mean = [0.85 * m + 0.15 * r for m, r in zip(mean, raws[t - 1], strict=True)]
        return mean

    for r in (t for t in range(1, 201) if s.is_reallocation(t)):
        every = ema(range(1, r + 1))
        windowed = ema([t for t in range(1, r + 1) if s.is_scored(t)])
        assert windowed == pytest.approx(every, rel=0.01)


def test_schedule_errors():
    with pytest.raises(ValueError, match="beyond the run"):
        Schedule.resolve(DynamicLoRAConfig(final=500), 100)
    with pytest.raises(ValueError, match="after final"):
        Schedule.resolve(DynamicLoRAConfig(warmup=0.9, final=0.5), 100)
    with pytest.raises(ValueError, match="fraction"):
        DynamicLoRAConfig(warmup=1.5)
    with pytest.raises(ValueError, match="step count"):
        DynamicLoRAConfig(interval=-1)


def test_share_parameter_equalises_importance_per_parameter_not_per_rank():
    from torch import nn

    from dynlora import DynamicLoRALinear
    from dynlora.allocator import RankAllocator

    layers = {
        "narrow": DynamicLoRALinear(nn.Linear(16, 16), 6, 12, max_rank=16),  # a rank costs 32 parameters
        "wide": DynamicLoRALinear(nn.Linear(16, 48), 6, 12, max_rank=16),  # a rank costs 64
    }
    scores = {"narrow": 1.0, "wide": 1.0}
    per_rank = RankAllocator(layers, DynamicLoRAConfig(rank=6, max_rank=16)).decide(scores)
    per_parameter = RankAllocator(layers, DynamicLoRAConfig(rank=6, max_rank=16, share="parameter")).decide(scores)
    assert per_rank == {"narrow": 6, "wide": 6}
    # The same budget (6·32 + 6·64 = 576) spent so that score per parameter is equal, r ∝ 1 / cost: 9 and 4.5,
    # rounded down, and the 32 parameters left give the narrow layer one more rank.
    assert per_parameter == {"narrow": 10, "wide": 4} and 10 * 32 + 4 * 64 == 576
    with pytest.raises(ValueError, match="share must be one of 'rank', 'parameter'"):
        DynamicLoRAConfig(share="flops")
