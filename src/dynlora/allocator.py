"""Budget schedule and cross-layer rank re-allocation.

At each re-allocation step the layers' importance scores (see importance.py) set their ranks:

    r_l = clip(λ · w_l, min_rank, max_rank_l),   w_l = score_l^(1/τ) / mean(score^(1/τ)),

with λ chosen so the adapter parameters Σ_l r_l·(in_l + out_l) fill the budget, then rounded down and topped up
one rank at a time by largest remainder while the budget allows. That is the paper's softmax allocation
α_l = exp(γ_l/τ)/Σ exp(γ_k/τ) applied to log-scores γ = log(score), which makes it independent of the scorer's
scale (a softmax over raw gradient norms of ~1e-4 would be uniform, over scores of ~100 one-hot). With equal
scores every layer gets the same rank: the static LoRA allocation. A layer that shrinks is first re-based
(DynamicLoRALinear.rebase) so it loses its weakest directions; a layer that grows gets new components whose B is
zero, so the model's output does not change at the moment of growth.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .config import DynamicLoRAConfig
from .importance import make_scorer
from .layer import DynamicLoRALinear
from .optim_state import clear_state, init_grown_state, rebase_state
from .probe import top_directions


def _steps(value: float | int, total: int) -> int:
    return int(value) if isinstance(value, int) else int(round(value * total))


@dataclass(frozen=True)
class Schedule:
    """Re-allocate at warmup, warmup + interval, ... while <= final; steps count optimizer steps from 1."""

    warmup: int
    interval: int
    final: int

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
        return cls(warmup, interval, final)

    def is_reallocation(self, step: int) -> bool:
        return self.warmup <= step <= self.final and (step - self.warmup) % self.interval == 0 and step > 0


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
    """Scores layers every step and re-allocates their ranks on the schedule. Bind it once to the optimizer.

    Driving it: after each ``optimizer.step()`` and before ``zero_grad()`` call :meth:`step` with the number of
    optimizer steps done so far (1, 2, ...). ``DynamicLoRAModel.update_and_allocate`` and the Trainer callback do.
    """

    def __init__(self, layers: dict[str, DynamicLoRALinear], config: DynamicLoRAConfig) -> None:
        self.layers = layers
        self.config = config
        self.scorer = make_scorer(config.importance, layers, config.beta1, config.beta2)
        self.costs = {n: m.in_features + m.out_features for n, m in layers.items()}
        self.min_ranks = {n: min(config.min_rank, m.max_rank) for n, m in layers.items()}
        initial = sum(self.costs[n] * m.rank for n, m in layers.items())
        self.budget = config.budget if config.budget is not None else initial
        floor = sum(self.costs[n] * self.min_ranks[n] for n in layers)
        if self.budget < floor:
            raise ValueError(
                f"budget of {self.budget} adapter parameters is below what min_rank={config.min_rank} on all "
                f"{len(layers)} layers needs ({floor}); raise budget or lower min_rank"
            )
        if initial > self.budget:
            raise ValueError(
                f"the initial ranks use {initial} adapter parameters, more than the budget of {self.budget}; "
                "lower rank or raise budget"
            )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.schedule: Schedule | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_step = 0
        self.history: list[dict] = []

    # --- binding and driving -----------------------------------------------------------------------------------

    def bind(self, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        """Bind the optimizer whose state must follow rank changes, and the run's length (resolves fractions)."""
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
        self.schedule = Schedule.resolve(self.config, total_steps)

    def step(self, step: int, grads: dict[str, torch.Tensor] | None = None) -> bool:
        """Update importance scores; re-allocate if ``step`` is on the schedule. Returns whether it re-allocated.
        ``grads``: this step's ∂L/∂W of layers (probe.py); a layer that grows starts its new components along
        them."""
        if self.schedule is None:
            raise RuntimeError("bind the optimizer first: model.bind_optimizer(optimizer, total_steps)")
        self.scorer.update(self.layers)
        self.last_step = step
        if not self.schedule.is_reallocation(step):
            return False
        scores = self.synced_scores()
        if not all(math.isfinite(s) for s in scores.values()):
            warnings.warn(f"step {step}: non-finite importance scores; ranks left unchanged", stacklevel=2)
            return False
        names = list(self.layers)
        lows, highs = self.bounds()
        targets = allocate(
            [scores[n] for n in names],
            [self.costs[n] for n in names],
            self.budget,
            [lows[n] for n in names],
            [highs[n] for n in names],
            self.config.temperature,
        )
        self.apply(dict(zip(names, targets, strict=True)), grads or {})
        self.history.append({"step": step, "ranks": self.ranks(), "scores": scores})
        return True

    def bounds(self) -> tuple[dict[str, int], dict[str, int]]:
        """Each layer's lowest and highest rank at this re-allocation: min_rank and the capacity, narrowed to
        ± ``max_rank_change`` around the current rank when that is set (the current allocation lies inside, so
        the budget can still be filled)."""
        k = self.config.max_rank_change
        lows, highs = {}, {}
        for name, layer in self.layers.items():
            lo, hi = self.min_ranks[name], layer.max_rank
            if k is not None:
                lo, hi = max(lo, layer.rank - k), min(hi, layer.rank + k)
            lows[name], highs[name] = min(lo, hi), hi
        return lows, highs

    def synced_scores(self) -> dict[str, float]:
        """Layer scores averaged over processes under torch.distributed, so every process decides the same.
        A collective: every process must call it (the allocator does, at each re-allocation)."""
        scores = self.scorer.layer_scores()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            values = torch.tensor([scores[n] for n in self.layers], dtype=torch.float64)
            torch.distributed.all_reduce(values)
            values /= torch.distributed.get_world_size()
            scores = dict(zip(self.layers, values.tolist(), strict=True))
        return scores

    @torch.no_grad()
    def apply(self, targets: dict[str, int], grads: dict[str, torch.Tensor] | None = None) -> None:
        """Move every layer to its target rank, keeping the optimizer state and the scores consistent. A growing
        layer with a measured gradient in ``grads`` starts its new components along its top directions not yet
        covered; otherwise they start random (both with B = 0)."""
        for name, layer in self.layers.items():
            old, new = layer.rank, targets[name]
            if new < old:
                t, t_inv = layer.rebase()
                rebase_state(self.optimizer, layer, t, t_inv)
                layer.set_rank(new)
                clear_state(self.optimizer, layer, new, old)
                self.scorer.rebased(name, old, new)
            elif new > old:
                layer.set_rank(new, self.generator)
                if grads and name in grads:
                    taken = layer.effective_rows()[:old]
                    layer.point_components(old, top_directions(grads[name], new - old, taken))
                init_grown_state(self.optimizer, layer, old, new)
                self.scorer.grown(name, old, new)

    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.layers.items()}

    def total_cost(self) -> int:
        """Adapter parameters the current ranks use (never above the budget after a re-allocation)."""
        return sum(self.costs[n] * m.rank for n, m in self.layers.items())

    # --- checkpointing -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "scorer": self.scorer.state_dict(),
            "ranks": self.ranks(),
            "budget": self.budget,
            "last_step": self.last_step,
            "history": [dict(h) for h in self.history],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, restore_ranks: bool = False) -> None:
        """Restore scores, schedule position, history and RNG.

        By default the layers' ranks must already match (restored with the adapter weights) and a mismatch is an
        error, never a silent divergence. ``restore_ranks=True`` sets them from the state instead, for weights
        restored at full capacity (a whole ``state_dict()``, as ``transformers.Trainer`` checkpoints hold)."""
        if set(state["ranks"]) != set(self.layers):
            raise ValueError("allocator state is for other layers than this model's adapters")
        if restore_ranks:
            for name, rank in state["ranks"].items():
                self.layers[name].set_rank(int(rank), init_new=False)
        if state["ranks"] != self.ranks():
            raise ValueError("allocator state does not match the adapter's current ranks; load the adapter first")
        if state["budget"] != self.budget:
            raise ValueError(f"allocator state has budget {state['budget']}, this model {self.budget}")
        self.scorer.load_state_dict(state["scorer"])
        self.last_step = int(state["last_step"])
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"])
