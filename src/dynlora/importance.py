"""Layer and rank-component importance, from what the ordinary backward pass already produced.

Every scorer turns the adapter's parameters and gradients into a raw score per active rank component i of a layer
(row i of A, column i of B), smooths it with an EMA Ī, and optionally with its uncertainty
U = EMA|I − Ī| (AdaLoRA, Zhang et al. 2023). A layer's score is the *sum* over its active components. A component
that was just added has B_i = 0 and so no sensitivity yet; a mean would fall at every growth and pull the layer
back at the next decision, so ranks would oscillate; a sum does not. With allocation ∝ score (allocator.py) this
makes each re-allocation a multiplicative update, r_l ← r_l · (importance per unit rank of l) / average, whose fixed
point is equal marginal importance across layers.

Scorers (selected by ``DynamicLoRAConfig.importance``):

- ``sensitivity`` (default): I_i = mean_j |A_ij ∂L/∂A_ij| + mean_k |B_ki ∂L/∂B_ki|, scored √(Ī·U): the same
  order as AdaLoRA's Ī·U, in the units of I, so allocation shares are not squared.
  Invariant to rescaling a component (A_i·c, B_i/c), so a change of basis does not change a layer's score much.
- ``gradient``: I_i = ‖(∂L/∂A_i, ∂L/∂B_i)‖₂, the loss sensitivity of the paper's rule γ_l = ∂L/∂W_l taken on the
  adapter's own factors; scored Ī.
- ``update_norm``: I_i = s·‖B_i‖·‖A_i‖, the size of the component's contribution to the weight update (needs no
  gradient); scored Ī.
"""

from __future__ import annotations

from typing import Any

import torch

from .lowrank import LowRankUpdate


class ImportanceScorer:
    """EMA of a per-component raw score (see the module doc). Subclasses define :meth:`raw`.

    State is one ``[layers, capacity]`` tensor per statistic on the layers' device, and an update reads nothing back
    to the host: a step with a non-finite score is masked out, not branched on. Scores reach the host when asked for
    (:meth:`layer_scores`: at re-allocations and for logging).

    A raw score is :meth:`parts` (a reduction over each component's row of A and column of B) then
    :meth:`combine`. On the CPU the parts are taken one layer at a time, where stacking layers would cost more
    memory traffic than it saves, and combined for all layers at once; on an accelerator all layers of one shape
    go together, where each of a few small ops per layer would otherwise be a kernel launch. Either way over the
    stored components (lowrank.py: the active ones, or the whole capacity under torch.distributed, where a slice
    would cost as much as the arithmetic on these sizes), inactive components masked.
    ``batched`` forces either way."""

    name = ""
    uses_uncertainty = False
    needs_grad = True

    def __init__(
        self,
        layers: dict[str, LowRankUpdate],
        beta1: float = 0.85,
        beta2: float = 0.85,
        batched: bool | None = None,
    ) -> None:
        self.beta1, self.beta2, self.batched = beta1, beta2, batched
        self.names = list(layers)
        self.row = {n: i for i, n in enumerate(self.names)}
        capacity = max((m.max_rank for m in layers.values()), default=0)
        device = next(iter(layers.values())).lora_A.device if layers else None
        self.mean = torch.zeros(len(layers), capacity, device=device)
        self.unc = torch.zeros(len(layers), capacity, device=device)
        # Layer score kept from the last time the layer was scored, so a layer at rank 0 can still win rank back.
        self.last_layer_score = torch.zeros(len(layers), dtype=torch.float64, device=device)
        self._skipped = torch.zeros((), dtype=torch.long, device=device)
        self._cache: dict[tuple, Any] = {}

    @property
    def skipped_nonfinite(self) -> int:
        """Steps whose scores were not finite and were left out (read from the device)."""
        return int(self._skipped)

    def parts(self, a: torch.Tensor, b: torch.Tensor, ga, gb) -> tuple[torch.Tensor, torch.Tensor]:
        """What each component's raw score needs of A ``[..., r, in]`` (a reduction over its row) and of
        B ``[..., out, r]`` (over its column), from them and their gradients: two ``[..., r]``."""
        raise NotImplementedError

    def combine(self, pa: torch.Tensor, pb: torch.Tensor, fan_in, fan_out, scaling) -> torch.Tensor:
        """The raw scores from :meth:`parts`, with each component's layer sizes and scaling (broadcastable)."""
        raise NotImplementedError

    def _scorable(self, layer: LowRankUpdate) -> bool:
        # A layer without gradients took no part in this step's loss (PEFT #1721).
        return layer.rank > 0 and not (self.needs_grad and (layer.lora_A.grad is None or layer.lora_B.grad is None))

    def _raw_per_layer(self, layers: dict[str, LowRankUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's scores over its stored components (no slicing: on a CPU each slice costs as much as the
        arithmetic; inactive components are masked), written into the ``[layers, capacity]`` table in one copy."""
        part_a, part_b, ranks = [], [], []
        for name in self.names:
            layer = layers.get(name)
            if layer is not None and self._scorable(layer):
                a, b = layer.lora_A, layer.lora_B
                pa, pb = self.parts(a, b, a.grad, b.grad) if self.needs_grad else self.parts(a, b, None, None)
                part_a.append(pa)
                part_b.append(pb)
                ranks.append(layer.rank)
            else:
                ranks.append(0)
        raw = torch.zeros_like(self.mean)
        if part_a:
            capacities = tuple(layers[n].stored if r else 0 for n, r in zip(self.names, ranks, strict=True))
            flat, fan_in, fan_out, scaling = self._components(capacities, layers, raw.device)
            scores = self.combine(torch.cat(part_a), torch.cat(part_b), fan_in, fan_out, scaling)
            raw.view(-1).index_copy_(0, flat, scores.float())
        return raw, self._mask(tuple(ranks), raw.device)

    def _raw_batched(self, layers: dict[str, LowRankUpdate]) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers of one (A, B) shape in one computation over their stored components; a layer without
        gradients is left out of its group this step."""
        device = self.mean.device
        raw = torch.zeros_like(self.mean)
        groups: dict[tuple, list[str]] = {}
        for name, layer in layers.items():
            if self._scorable(layer):
                groups.setdefault((layer.lora_A.shape, layer.lora_B.shape), []).append(name)
        for (a_shape, _), names in groups.items():
            members = [layers[n] for n in names]
            a = torch.stack([m.lora_A.detach() for m in members])
            b = torch.stack([m.lora_B.detach() for m in members])
            ga = torch.stack([m.lora_A.grad for m in members]) if self.needs_grad else None
            gb = torch.stack([m.lora_B.grad for m in members]) if self.needs_grad else None
            rows, scaling = self._group(tuple(names), members, device)
            pa, pb = self.parts(a, b, ga, gb)
            raw[rows, : a_shape[0]] = self.combine(pa, pb, a_shape[1], b.shape[1], scaling).float()
        included = {n for names in groups.values() for n in names}
        ranks = tuple(layers[n].rank if n in included else 0 for n in self.names)
        return raw, self._mask(ranks, device)

    def _group(
        self, names: tuple[str, ...], members: list[LowRankUpdate], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A group's row indices and scalings ``[n, 1]``, made once on the device."""
        key = ("group", names, device)
        if key not in self._cache:
            rows = torch.tensor([self.row[n] for n in names], device=device)
            self._cache[key] = rows, torch.tensor([[m.scaling] for m in members], device=device)
        return self._cache[key]

    def _components(
        self, capacities: tuple[int, ...], layers: dict[str, LowRankUpdate], device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """For the scored layers' components in order (``capacities[l]`` of layer l, 0 when not scored): their flat
        indices in the table and their layers' fan-in, fan-out and scaling; made when the scored set changes."""
        key = ("components", capacities, device)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "components"}
            capacity = self.mean.shape[1]
            rows = torch.arange(capacity, device=device) < torch.tensor(capacities, device=device)[:, None]
            scored = [(layers[n], c) for n, c in zip(self.names, capacities, strict=True) if c]
            fan_in, fan_out, scaling = (
                torch.tensor([v for m, c in scored for v in [f(m)] * c], device=device)
                for f in (lambda m: float(m.in_features), lambda m: float(m.out_features), lambda m: m.scaling)
            )
            self._cache[key] = rows.view(-1).nonzero().view(-1), fan_in, fan_out, scaling
        return self._cache[key]

    def _mask(self, ranks: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``[layers, capacity]``: component i of layer l is scored when i < rank_l; made again only when the ranks
        change."""
        key = ("mask", ranks, device)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "mask"}
            capacity = self.mean.shape[1]
            self._cache[key] = torch.arange(capacity, device=device) < torch.tensor(ranks, device=device)[:, None]
        return self._cache[key]

    def _follow(self, device: torch.device) -> None:
        """Keep the state on the layers' device (a model moved after wrapping takes it along)."""
        if self.mean.device != device:
            self.mean, self.unc = self.mean.to(device), self.unc.to(device)
            self.last_layer_score, self._skipped = self.last_layer_score.to(device), self._skipped.to(device)

    @torch.no_grad()
    def update(self, layers: dict[str, LowRankUpdate]) -> None:
        """Fold this step's raw scores into the EMAs. Call after backward, before the gradients are zeroed.
        Layers without gradients (frozen, unused this step) or whose scores are all zero (a zero gradient, as an
        expert that no token was routed to gets) are left as they were; a step with any non-finite
        score is skipped whole and counted."""
        if layers:
            self._follow(next(iter(layers.values())).lora_A.device)
        batched = self.mean.device.type != "cpu" if self.batched is None else self.batched
        raw, scored = self._raw_batched(layers) if batched else self._raw_per_layer(layers)
        if self.needs_grad:  # all-zero: no gradient reached the layer (an expert no token was routed to)
            scored = scored & (raw != 0).any(dim=1, keepdim=True)
        finite = torch.isfinite(raw).all()
        scored &= finite
        new_mean = torch.where(scored, self.beta1 * self.mean + (1 - self.beta1) * raw, self.mean)
        new_unc = self.beta2 * self.unc + (1 - self.beta2) * (raw - new_mean).abs()
        self.unc = torch.where(scored, new_unc, self.unc)
        self.mean = new_mean
        layer_scores = (self._scores() * scored).sum(dim=1).double()
        self.last_layer_score = torch.where(scored.any(dim=1), layer_scores, self.last_layer_score)
        self._skipped += (~finite).long()

    def _scores(self) -> torch.Tensor:
        return (self.mean * self.unc).sqrt() if self.uses_uncertainty else self.mean

    def layer_scores(self) -> dict[str, float]:
        """Layer name -> importance (sum over its active components; the last value for a layer at rank 0)."""
        return dict(zip(self.names, self.last_layer_score.tolist(), strict=True))

    def rebased(self, name: str, old_rank: int, new_rank: int) -> None:
        """The layer was re-expressed in a new basis and kept ``new_rank`` components: per-component history does
        not carry over, so each kept component takes the mean state of the old ones."""
        i = self.row[name]
        for state in (self.mean, self.unc):
            state[i, :new_rank] = state[i, :old_rank].mean() if old_rank > 0 else 0.0
            state[i, new_rank:] = 0.0

    def grown(self, name: str, old_rank: int, new_rank: int) -> None:
        """Components [old_rank, new_rank) were added: they start at zero, as their sensitivity does (B_i = 0),
        which leaves the layer's score unchanged."""
        i = self.row[name]
        for state in (self.mean, self.unc):
            state[i, old_rank:new_rank] = 0.0

    def state_dict(self) -> dict:
        """The state on the CPU (a checkpoint loads on any device)."""
        return {
            "name": self.name,
            "names": list(self.names),
            "mean": self.mean.cpu().clone(),
            "unc": self.unc.cpu().clone(),
            "last_layer_score": self.last_layer_score.cpu().clone(),
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["name"] != self.name:
            raise ValueError(f"importance state is from scorer {state['name']!r}, this run uses {self.name!r}")
        if state["names"] != self.names or state["mean"].shape != self.mean.shape:
            raise ValueError("importance state is for other layers than this model's adapters")
        device = self.mean.device
        self.mean, self.unc = state["mean"].to(device).clone(), state["unc"].to(device).clone()
        self.last_layer_score = state["last_layer_score"].to(device).clone()
        self._skipped = torch.tensor(int(state["skipped_nonfinite"]), device=device)


class SensitivityScorer(ImportanceScorer):
    name = "sensitivity"
    uses_uncertainty = True

    def parts(self, a, b, ga, gb):
        return (a * ga).abs_().sum(dim=-1), (b * gb).abs_().sum(dim=-2)

    def combine(self, pa, pb, fan_in, fan_out, scaling):
        return pa / fan_in + pb / fan_out  # the means over A's row and B's column


class GradientScorer(ImportanceScorer):
    name = "gradient"

    def parts(self, a, b, ga, gb):
        return ga.square().sum(dim=-1), gb.square().sum(dim=-2)

    def combine(self, pa, pb, fan_in, fan_out, scaling):
        return (pa + pb).sqrt()


class UpdateNormScorer(ImportanceScorer):
    name = "update_norm"
    needs_grad = False

    def parts(self, a, b, ga, gb):
        return a.norm(dim=-1), b.norm(dim=-2)

    def combine(self, pa, pb, fan_in, fan_out, scaling):
        return pa * pb * scaling


SCORERS: dict[str, type[ImportanceScorer]] = {
    cls.name: cls for cls in (SensitivityScorer, GradientScorer, UpdateNormScorer)
}


def make_scorer(name: str, layers: dict[str, LowRankUpdate], beta1: float, beta2: float) -> ImportanceScorer:
    if name not in SCORERS:
        raise ValueError(f"unknown importance scorer {name!r}; choose one of: {', '.join(SCORERS)}")
    return SCORERS[name](layers, beta1, beta2)
