"""The Dynamic LoRA engine: what happens after each optimizer step.

    step s:  commit input statistics (folded in every input_norm_every steps) → (init="gradient", "lora-ga") read
             the probes' ∂L/∂W → on step 1, start every layer's components from it → in the steps leading to a
             re-allocation, update importance → on the schedule, re-allocate ranks

One object owns everything that changes ranks or starts components: the bound optimizer (its state follows every
change), the :class:`~dynlora.allocator.Schedule`, the importance scorer, the :class:`~dynlora.allocator.RankAllocator`
that decides, the gradient probes (hooks attached only on the steps that need them), and the list of allocation
``events`` that the training loop, the Trainer callback and the report read.

Carrying a decision out keeps three things consistent for every layer that changes:

- shrink r → r': re-base the layer (strongest directions first), map its optimizer state into the new basis,
  drop the trailing components, clear their state, tell the scorer;
- grow r → r' (and the first step, as growth from 0): new components, along the top directions of ∂L/∂W that the
  layer does not cover yet when measured (else random rows), B = 0 so the output is unchanged, fresh optimizer
  state (:func:`start_components`).
"""

from __future__ import annotations

import math
import warnings

import torch

from .allocator import RankAllocator, Schedule
from .config import DynamicLoRAConfig
from .distributed import in_process_group
from .importance import make_scorer
from .input_statistics import InputStatistics
from .lowrank import LowRankUpdate
from .optim_state import clear_state, fit_state, init_grown_state, rebase_state
from .probe import lora_ga_factors, make_probe, synced_gradients, top_directions


@torch.no_grad()
def start_components(optimizer, layer: LowRankUpdate, start: int, stop: int, weight_grad: torch.Tensor | None) -> None:
    """Components [start, stop) begin: along the top directions of ``weight_grad`` (the layer's measured ∂L/∂W)
    not covered by components [0, start) (their rows as set by ``set_rank`` when none was measured), B = 0, with
    fresh optimizer state."""
    if weight_grad is not None and stop > start:
        taken = layer.effective_rows()[:start]
        layer.point_components(start, top_directions(weight_grad, stop - start, taken))
    init_grown_state(optimizer, layer, start, stop)


@torch.no_grad()
def start_lora_ga(optimizer, layer: LowRankUpdate, weight_grad: torch.Tensor) -> None:
    """Every component starts as LoRA-GA's (probe.py), the base weight offset by the start's update so the output
    does not change (layer.py), with fresh optimizer state."""
    a, b = lora_ga_factors(weight_grad, layer.rank)
    layer.set_components(0, a, b)
    layer.set_offset(*layer.mergeable_factors())
    init_grown_state(optimizer, layer, 0, layer.rank)


class Engine:
    """Drives the adapters of one model; see the module doc. ``DynamicLoRAModel`` exposes it as ``.engine``."""

    def __init__(self, layers: dict[str, LowRankUpdate], config: DynamicLoRAConfig) -> None:
        self.layers = layers
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        if config.reallocate and config.start_ratio > 1:  # over-parameterised start: the allocator prunes to budget
            for layer in layers.values():
                layer.set_rank(min(layer.max_rank, round(config.start_ratio * layer.rank)), self.generator)
        self.allocator = RankAllocator(layers, config) if config.reallocate else None
        if config.init == "lora-ga":
            for name, layer in layers.items():
                if not hasattr(layer, "reserve_offset"):
                    raise ValueError(
                        f"init='lora-ga' offsets the weights of linear layers, and {name} is an expert of a fused "
                        "parameter; use init='gradient', or target_modules without the experts"
                    )
                layer.reserve_offset(layer.rank)
        self.scorer = make_scorer(config.importance, layers, config.beta1, config.beta2) if config.reallocate else None
        self.input_statistics = InputStatistics([m.input_norm for m in layers.values() if m.input_norm is not None])
        self.probes = {n: make_probe(m) for n, m in layers.items()} if config.init != "lora" else {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.schedule: Schedule | None = None
        # False until components have started (a step done, or an adapter loaded): never start them twice.
        self.started = False
        self.events: list[dict] = []

    # --- driving -------------------------------------------------------------------------------------------------

    def bind(self, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
        if self.allocator is not None:
            self.schedule = Schedule.resolve(self.config, total_steps)
            if self.schedule.next_reallocation(1) is None and self.total_cost() > self.budget:
                warnings.warn(
                    f"the schedule (warmup step {self.schedule.warmup}, final step {self.schedule.final} of "
                    f"{total_steps}) re-allocates after no step, so the over-parameterised start "
                    f"({self.total_cost()} adapter parameters) is never pruned to the budget of {self.budget}: "
                    "schedule a re-allocation within the run (warmup, final), or set start_ratio=1",
                    stacklevel=3,
                )
        self._arm_probes(1)

    def step(self, step: int) -> bool:
        """After optimizer step ``step`` (1, 2, ...), before ``zero_grad()``; returns whether ranks were
        re-allocated."""
        if self.allocator is not None and self.schedule is None:
            raise RuntimeError("bind the optimizer first: model.bind_optimizer(optimizer, total_steps)")
        self.input_statistics.commit(step, self.config.input_norm_every)
        weight_grads = self._take_weight_gradients()
        if step == 1 and not self.started:
            for name, weight_grad in weight_grads.items():
                if self.config.init == "lora-ga":
                    start_lora_ga(self.optimizer, self.layers[name], weight_grad)
                else:
                    start_components(self.optimizer, self.layers[name], 0, self.layers[name].rank, weight_grad)
            unmeasured = [n for n in self.probes if n not in weight_grads and self.layers[n].rank > 0]
            if unmeasured:
                warnings.warn(
                    f"{len(unmeasured)} layer(s) received no gradient on the first step and start at random (as "
                    f"LoRA), not along ∂L/∂W: the forward never used them, e.g. {unmeasured[0]}",
                    stacklevel=3,
                )
        self.started = True
        reallocated = False
        if self.scorer is not None and self.schedule.is_scored(step):
            self.scorer.update(self.layers)
            if self.schedule.is_reallocation(step):
                reallocated = self._reallocate(step, weight_grads)
        self._arm_probes(step + 1)
        return reallocated

    def skip(self) -> None:
        """A step whose update was skipped: drop its input statistics and measured gradients."""
        self.input_statistics.discard()
        for probe in self.probes.values():
            if probe.armed:
                probe.arm()  # the step is tried again with the next batch: measure it afresh

    def _reallocate(self, step: int, weight_grads: dict[str, torch.Tensor]) -> bool:
        scores = self.synced_scores()
        if not all(math.isfinite(s) for s in scores.values()):
            warnings.warn(f"step {step}: non-finite importance scores; ranks left unchanged", stacklevel=3)
            return False
        budget = self.allocator.budget_at(self.schedule.progress(step))
        self.resize(self.allocator.decide(scores, budget), weight_grads)
        if step == self.schedule.last and self.total_cost() > self.budget:
            warnings.warn(
                f"the last re-allocation leaves {self.total_cost()} adapter parameters, above the budget of "
                f"{self.budget}: max_rank_change={self.config.max_rank_change} shrinks layers too slowly to prune "
                "from start_ratio's ranks; raise it or lower start_ratio",
                stacklevel=3,
            )
        self.events.append({"step": step, "ranks": self.ranks(), "scores": scores})
        return True

    def _arm_probes(self, step: int) -> None:
        """Measure ∂L/∂W on ``step`` if it needs it: the first, or a re-allocation (grown components)."""
        wanted = step == 1 or (self.schedule is not None and self.schedule.is_reallocation(step))
        for probe in self.probes.values():
            probe.arm() if wanted else probe.disarm()

    def _take_weight_gradients(self) -> dict[str, torch.Tensor]:
        """The measured ∂L/∂W of each layer on this step (synced over processes), and disarm; {} if none."""
        named = {n: p for n, p in self.probes.items() if p.armed}
        if not named:
            return {}
        measured = synced_gradients(list(named.values()))
        for probe in named.values():
            probe.disarm()
        return {n: g for n, g in zip(named, measured, strict=True) if g is not None}

    # --- carrying out a decision ---------------------------------------------------------------------------------

    @torch.no_grad()
    def resize(self, targets: dict[str, int], weight_grads: dict[str, torch.Tensor] | None = None) -> None:
        """Move every layer to its target rank (module doc), keeping optimizer state and scores consistent."""
        weight_grads = weight_grads or {}
        for name, layer in self.layers.items():
            old, new = layer.rank, targets[name]
            if new < old:
                t, t_inv = layer.rebase()
                rebase_state(self.optimizer, layer, t, t_inv)
                self.set_rank(name, new)
                clear_state(self.optimizer, layer, new, old)
                if self.scorer is not None:
                    self.scorer.rebased(name, old, new)
            elif new > old:
                self.set_rank(name, new, self.generator)
                start_components(self.optimizer, layer, old, new, weight_grads.get(name))
                if self.scorer is not None:
                    self.scorer.grown(name, old, new)

    def set_rank(self, name: str, rank: int, generator: torch.Generator | None = None, init_new: bool = True) -> None:
        """Set one layer's active rank (:meth:`LowRankUpdate.set_rank`), its optimizer state following its storage."""
        layer = self.layers[name]
        layer.set_rank(rank, generator, init_new=init_new)
        fit_state(self.optimizer, layer)

    # --- reading -------------------------------------------------------------------------------------------------

    def reallocation_due_by(self, step: int) -> bool:
        """Whether the schedule re-allocates at some step up to ``step`` (False for a static allocation)."""
        return self.schedule is not None and self.schedule.warmup <= min(step, self.schedule.final)

    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.layers.items()}

    @property
    def budget(self) -> int | None:
        """Adapter parameters the allocation may use once the schedule is done (None for a static allocation)."""
        return None if self.allocator is None else self.allocator.budget

    @property
    def start_budget(self) -> int | None:
        """Adapter parameters the layers started with, when above the budget (over-parameterised), else the budget;
        None for a static allocation."""
        return None if self.allocator is None else self.allocator.start_budget

    def total_cost(self) -> int:
        """Adapter parameters the current ranks use."""
        return sum((m.in_features + m.out_features) * m.rank for m in self.layers.values())

    def importance(self) -> dict[str, float]:
        """Layer name -> importance score of this process; {} for a static allocation."""
        return {} if self.scorer is None else self.scorer.layer_scores()

    def synced_scores(self) -> dict[str, float]:
        """Layer scores averaged over processes under torch.distributed, so every process decides the same.
        A collective: every process must call it (the engine does, at each re-allocation)."""
        values = self.scorer.last_layer_score.clone()
        if in_process_group():
            torch.distributed.all_reduce(values)
            values /= torch.distributed.get_world_size()
        return dict(zip(self.layers, values.tolist(), strict=True))

    # --- checkpointing -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Scores, ranks, budget, events and the growth RNG (empty for a static allocation)."""
        if self.allocator is None:
            return {}
        return {
            "format_version": ENGINE_STATE_VERSION,
            "scorer": self.scorer.state_dict(),
            "ranks": self.ranks(),
            "budget": self.budget,
            "start_budget": self.start_budget,
            "events": [dict(e) for e in self.events],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict, restore_ranks: bool = False) -> None:
        """Restore what :meth:`state_dict` saved (or dynlora 0.1's allocator state).

        By default the layers' ranks must already match (restored with the adapter weights) and a mismatch is an
        error, never a silent divergence. ``restore_ranks=True`` sets them from the state instead, for weights
        restored from a whole ``state_dict()`` (as ``transformers.Trainer`` checkpoints hold). Either way the bound
        optimizer's state, loaded as it was saved, is fitted to the layers' storage (a checkpoint written at the
        whole capacity resumes)."""
        for layer in self.layers.values():
            fit_state(self.optimizer, layer)
        if self.allocator is None:
            return
        if state.get("format_version", 1) == 1:
            state = _state_v1_to_v2(state)
        if state["format_version"] == 2:
            state = _state_v2_to_v3(state)
        if set(state["ranks"]) != set(self.layers):
            raise ValueError("engine state is for other layers than this model's adapters")
        if restore_ranks:
            for name, rank in state["ranks"].items():
                self.set_rank(name, int(rank), init_new=False)
        if state["ranks"] != self.ranks():
            raise ValueError("engine state does not match the adapter's current ranks; load the adapter first")
        if state["budget"] != self.budget:
            raise ValueError(f"engine state has budget {state['budget']}, this model {self.budget}")
        if state["start_budget"] != self.start_budget:
            raise ValueError(
                f"engine state has start_budget {state['start_budget']}, this model {self.start_budget}: its run "
                f"started at {state['start_budget'] / state['budget']:.2f}x the budget, this model at "
                f"{self.start_budget / self.budget:.2f}x; build the model with the start_ratio the run used (1.0 for a "
                "run saved before 1.5 became the default)"
            )
        self.scorer.load_state_dict(state["scorer"])
        self.events = [dict(e) for e in state["events"]]
        self.generator.set_state(state["generator"])
        self.started = True


ENGINE_STATE_VERSION = 3


def _state_v1_to_v2(state: dict) -> dict:
    """dynlora 0.1 saved the allocator's state: the same content, its events under ``history``, plus counters
    that are gone (``last_step``, the scorer's ``updates``)."""
    scorer = {k: v for k, v in state["scorer"].items() if k != "updates"}
    kept = {k: v for k, v in state.items() if k not in ("history", "last_step", "scorer")}
    return {**kept, "format_version": 2, "scorer": scorer, "events": state["history"]}


def _state_v2_to_v3(state: dict) -> dict:
    """Before the over-parameterised start, layers always started within the budget."""
    return {**state, "format_version": 3, "start_budget": state["budget"]}
