"""Budget schedule and cross-layer rank re-allocation.

At each re-allocation step the layers' importance scores (see importance.py) set their ranks:

    r_l = clip(λ · w_l, min_rank, max_rank_l),   w_l = score_l^(1/τ) / mean(score^(1/τ)),

with λ chosen so the adapter parameters Σ_l r_l·(in_l + out_l) fill the budget, then rounded down and topped up
one rank at a time by largest remainder while the budget allows. That is the paper's softmax allocation
α_l = exp(γ_l/τ)/Σ exp(γ_k/τ) applied to log-scores γ = log(score), which makes it independent of the scorer's
scale (a softmax over raw gradient norms of ~1e-4 would be uniform, over scores of ~100 one-hot). With equal
scores every layer gets the same rank: the static LoRA allocation.

A layer's score is a sum over its components, so r_l ∝ score_l settles where every layer's importance per rank is
the same. A rank of a wide layer costs more parameters (in + out) than one of a narrow layer, though, so under a
parameter budget the optimum is equal importance per *parameter*: ``share="parameter"`` allocates with
w_l from score_l / (in_l + out_l) instead. engine.py carries the decision out.

Layers may start above the budget (``start_ratio`` > 1: over-parameterise, then prune, as AdaLoRA's init_r →
target_r). The budget of a re-allocation then falls from the starting cost P₀ to the budget P along AdaLoRA's
cubic schedule, P(t) = P + (P₀ − P)·(1 − p)³ with p the fraction of the re-allocations' span done (0 at warmup,
1 at the last one, at or before final): it prunes fastest while the scores are young and the components least
trained, and meets P at the last re-allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import DynamicLoRAConfig
from .lowrank import LowRankUpdate


def _steps(value: float | int, total: int) -> int:
    return int(value) if isinstance(value, int) else int(round(value * total))


def score_window(beta1: float, beta2: float, tolerance: float = 0.01) -> int:
    """Steps of importance EMA a re-allocation depends on: a score taken w steps earlier weighs β^w, and the
    smallest w with max(β1, β2)^w <= ``tolerance`` bounds what the steps before the window contribute (≤ 1 %)."""
    beta = max(beta1, beta2)
    return 1 if beta <= 0 else max(1, math.ceil(math.log(tolerance) / math.log(beta)))


@dataclass(frozen=True)
class Schedule:
    """Re-allocate at warmup, warmup + interval, ... while <= final; steps count optimizer steps from 1.

    Importance is scored only on the ``window`` steps that end at each re-allocation (:func:`score_window`): the
    EMA forgets older steps to within 1 %, so scoring the others, and anything after ``final``, would cost every
    step and change no decision."""

    warmup: int
    interval: int
    final: int
    window: int = 1

    @classmethod
    def resolve(cls, config: DynamicLoRAConfig, total_steps: int) -> Schedule:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        warmup, final = _steps(config.warmup, total_steps), _steps(config.final, total_steps)
        interval = max(1, _steps(config.interval, total_steps))
        if final > total_steps:
            raise ValueError(
                f"the re-allocation schedule ends at step {final}, beyond the run's {total_steps} steps; "
                "lower final (or give it as a fraction of training, e.g. 0.8)"
            )
        if warmup > final:
            raise ValueError(f"warmup ({warmup} steps) is after final ({final} steps): no re-allocation would happen")
        return cls(warmup, interval, final, score_window(config.beta1, config.beta2))

    def is_reallocation(self, step: int) -> bool:
        return self.warmup <= step <= self.final and (step - self.warmup) % self.interval == 0 and step > 0

    def next_reallocation(self, step: int) -> int | None:
        """The first re-allocation at or after ``step`` (>= 1), or None when none is left."""
        ahead = max(0, step - self.warmup)
        upcoming = self.warmup + -(-ahead // self.interval) * self.interval
        return upcoming if upcoming <= self.final else None

    @property
    def last(self) -> int:
        """The last re-allocation: the last warmup + k·interval that is not after final."""
        return self.warmup + (self.final - self.warmup) // self.interval * self.interval

    def progress(self, step: int) -> float:
        """Fraction of the re-allocations' span done at ``step``: 0 up to warmup, 1 from the last one."""
        if self.last == self.warmup:
            return 1.0 if step >= self.last else 0.0
        return min(1.0, max(0.0, (step - self.warmup) / (self.last - self.warmup)))

    def is_scored(self, step: int) -> bool:
        """Whether importance is scored after ``step``: it is one of the ``window`` steps up to a re-allocation."""
        upcoming = self.next_reallocation(step)
        return upcoming is not None and upcoming - step < self.window


def allocate(
    scores: list[float],
    costs: list[int],
    budget: int,
    min_ranks: list[int],
    max_ranks: list[int],
    temperature: float = 1.0,
) -> list[int]:
    """Integer ranks with Σ costs·ranks <= budget and min <= rank <= max, shares ∝ score^(1/τ) (module doc).

    Deterministic: no randomness; ties go to the earlier layer."""
    n = len(scores)
    floor_cost = sum(c * lo for c, lo in zip(costs, min_ranks, strict=True))
    if floor_cost > budget:
        raise ValueError(f"budget of {budget} parameters is below the {floor_cost} that min_rank on every layer needs")
    clean = [max(float(s), 0.0) if math.isfinite(s) else 0.0 for s in scores]
    weights = [s ** (1.0 / temperature) for s in clean]
    total = sum(weights)
    weights = [w * n / total for w in weights] if total > 0 else [1.0] * n

    def ranks_at(lam: float) -> list[float]:
        return [min(max(lam * w, lo), hi) for w, lo, hi in zip(weights, min_ranks, max_ranks, strict=True)]

    def cost(ranks: list[float]) -> float:
        return sum(c * r for c, r in zip(costs, ranks, strict=True))

    if cost(max_ranks) <= budget:
        return list(max_ranks)
    lo_lam, hi_lam = 0.0, max(hi / w for w, hi in zip(weights, max_ranks, strict=True) if w > 0) + 1.0
    for _ in range(100):  # bisection on λ: cost(ranks_at(λ)) is non-decreasing in λ
        mid = (lo_lam + hi_lam) / 2
        lo_lam, hi_lam = (mid, hi_lam) if cost(ranks_at(mid)) <= budget else (lo_lam, mid)
    continuous = ranks_at(lo_lam)
    ranks = [max(lo, min(hi, math.floor(r + 1e-9))) for r, lo, hi in zip(continuous, min_ranks, max_ranks, strict=True)]
    left = budget - cost(ranks)
    # Top up by largest remainder; further passes place what shares cannot (zero-score layers when the rest is full).
    order = sorted(range(n), key=lambda i: (-(continuous[i] - ranks[i]), i))
    placed = True
    while placed:
        placed = False
        for i in order:
            if ranks[i] < max_ranks[i] and costs[i] <= left:
                ranks[i] += 1
                left -= costs[i]
                placed = True
    return ranks


class RankAllocator:
    """The budget and the decision: which rank each layer gets for given importance scores.

    Costs are adapter parameters per rank of a layer (in + out); the budget defaults to what the layers' initial
    ranks (the ranks they were built with, which set their scale) use; layers that start above it are pruned to it
    on the schedule (:meth:`budget_at`). It only decides; engine.py moves the layers, their optimizer state and
    their scores."""

    def __init__(self, layers: dict[str, LowRankUpdate], config: DynamicLoRAConfig) -> None:
        self.layers = layers
        self.temperature = config.temperature
        self.per_parameter = config.share == "parameter"
        self.max_rank_change = config.max_rank_change
        self.costs = {n: m.in_features + m.out_features for n, m in layers.items()}
        self.min_ranks = {n: min(config.min_rank, m.max_rank) for n, m in layers.items()}
        initial = sum(self.costs[n] * m.initial_rank for n, m in layers.items())
        self.budget = config.budget if config.budget is not None else initial
        self.start_budget = max(self.budget, self.total_cost())  # P₀: what the layers start with (module doc)
        floor = sum(self.costs[n] * self.min_ranks[n] for n in layers)
        if self.budget < floor:
            raise ValueError(
                f"budget of {self.budget} adapter parameters is below what min_rank={config.min_rank} on all "
                f"{len(layers)} layers needs ({floor}); raise budget or lower min_rank"
            )

    def budget_at(self, progress: float) -> int:
        """The budget of a re-allocation ``progress`` of the way through the schedule: P₀ falling to the budget
        along a cubic (module doc); the budget itself when the layers did not start above it."""
        return self.budget + int((self.start_budget - self.budget) * (1.0 - progress) ** 3)

    def decide(self, scores: dict[str, float], budget: int | None = None) -> dict[str, int]:
        """Target rank of every layer for these scores (see :func:`allocate`), within :meth:`bounds`, spending
        ``budget`` (default: the budget). A step limit (``max_rank_change``) can hold the cost above ``budget``:
        then each layer shrinks by the limit, and the schedule's later re-allocations prune the rest."""
        names = list(self.layers)
        lows, highs = self.bounds()
        budget = self.budget if budget is None else budget
        budget = max(budget, sum(self.costs[n] * lows[n] for n in names))
        # Per parameter: a rank of layer l costs c_l, so r_l ∝ score_l / c_l makes the importance per parameter
        # equal across layers at the fixed point (the KKT condition of max Σ f_l(r_l) s.t. Σ c_l r_l = budget).
        targets = allocate(
            [scores[n] / self.costs[n] if self.per_parameter else scores[n] for n in names],
            [self.costs[n] for n in names],
            budget,
            [lows[n] for n in names],
            [highs[n] for n in names],
            self.temperature,
        )
        return dict(zip(names, targets, strict=True))

    def bounds(self) -> tuple[dict[str, int], dict[str, int]]:
        """Each layer's lowest and highest rank at this re-allocation: min_rank and the capacity, narrowed to
        ± ``max_rank_change`` around the current rank when that is set (the current allocation lies inside, so
        the budget can still be filled)."""
        k = self.max_rank_change
        lows, highs = {}, {}
        for name, layer in self.layers.items():
            lo, hi = self.min_ranks[name], layer.max_rank
            if k is not None:
                lo, hi = max(lo, layer.rank - k), min(hi, layer.rank + k)
            lows[name], highs[name] = min(lo, hi), hi
        return lows, highs

    def total_cost(self) -> int:
        """Adapter parameters the current ranks use (never above the budget after the last re-allocation)."""
        return sum(self.costs[n] * m.rank for n, m in self.layers.items())
