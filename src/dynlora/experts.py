"""Dynamic LoRA on bare weight parameters: mixture-of-experts experts and routers.

In transformers 5 a mixture-of-experts block keeps its experts fused, one 3-D parameter per projection
(``gate_up_proj`` ``[E, 2·inter, hidden]``, ``down_proj`` ``[E, hidden, inter]``: expert e computes
``x @ W[e]ᵀ``; ``[E, in, out]`` where the module says ``is_transposed``), and its router is a bare 2-D ``weight``
``[E, hidden]`` read by its own forward. Neither is an ``nn.Linear``, so each gets one low-rank update per expert
(a router: one for the whole weight), each a :class:`~dynlora.lowrank.LowRankUpdate` of its own:

    W'[e] = W[e] + s_e · B_e[:, :r_e] A_e[:r_e]

Every expert's update is a layer to the engine: it has its own importance score and its own rank, and the budget
moves rank between experts as between layers. Routing sends each expert different tokens, so this is where
importance should differ most.

The module that holds the parameters is wrapped (PEFT's ``ParamWrapper`` does the same): the wrapper's forward
builds the updated weights, expert by expert at each expert's active rank, and calls the module's own forward with
them (``torch.func.functional_call``), so any experts implementation (a loop over experts, grouped GEMMs) computes
with the updated weights. As in PEFT the updated weights are materialised: memory follows the expert weights of
the block being computed. An expert that receives no token in a step gets a zero gradient, and the importance
scorer leaves a layer with an all-zero gradient as it was (no decision from a missing gradient).

Input adaptation and dropout act on a layer's inputs, which a weight update does not see: they apply to linear
layers only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .lowrank import LowRankUpdate, adapter_dtype

LORA = "lora"  # the wrapper's child holding the updates: <module>.lora.<parameter>.<expert>


def parameter_dims(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, in_features, out_features) of an adaptable bare parameter: a 3-D fused expert weight ``[E, out,
    in]`` (``[E, in, out]`` when the module is ``is_transposed``), or a 2-D router weight ``[out, in]`` (one)."""
    shape = getattr(module, name).shape
    if len(shape) == 3:
        experts, d1, d2 = (int(d) for d in shape)
        return (experts, d1, d2) if getattr(module, "is_transposed", False) else (experts, d2, d1)
    if len(shape) == 2:
        return 1, int(shape[1]), int(shape[0])
    raise ValueError(f"{type(module).__name__}.{name} has {len(shape)} dimensions; only 2-D and 3-D are adaptable")


def target_name(module: str, parameter: str, expert: int) -> str:
    """The name of one expert's update: ``<module>.lora.<parameter>.<expert>`` (its path in the wrapped model)."""
    return f"{module}.{LORA}.{parameter}.{expert}"


def split_target_name(name: str) -> tuple[str, str, int]:
    """(module, parameter, expert) of a :func:`target_name`."""
    head, _, expert = name.rpartition(".")
    module, _, parameter = head.rpartition(f".{LORA}.")
    return module, parameter, int(expert)


class ExpertUpdate(LowRankUpdate):
    """One expert's update of a fused parameter (``parameter``, ``expert``; ``kind``: "expert", or "router" for a
    router's whole weight); ``watch``: a gradient probe measuring ∂L/∂W[e] on this step (probe.py), else None."""

    def __init__(self, parameter: str, expert: int, kind: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parameter, self.expert, self.kind = parameter, expert, kind
        self.watch = None


class DynamicLoRAParameters(nn.Module):
    """Wraps a module whose weights are bare parameters (a fused experts block, a router) with one
    :class:`ExpertUpdate` per expert of each adapted parameter.

    Args:
        base_layer: the module; its parameters stay where they are, frozen.
        specs: parameter name -> one ``(rank, alpha, max_rank)`` per expert.
        rslora: scale by ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
    """

    def __init__(
        self, base_layer: nn.Module, specs: dict[str, list[tuple[int, float, int]]], rslora: bool = False
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.transposed = bool(getattr(base_layer, "is_transposed", False))
        updates = {}
        for name, experts in specs.items():
            weight = getattr(base_layer, name)
            count, in_f, out_f = parameter_dims(base_layer, name)
            if len(experts) != count:
                raise ValueError(f"{name} has {count} experts, {len(experts)} update specs were given")
            factory = {"device": weight.device, "dtype": adapter_dtype(weight)}
            kind = "expert" if weight.dim() == 3 else "router"
            updates[name] = nn.ModuleList(
                ExpertUpdate(name, e, kind, in_f, out_f, rank, alpha, max_rank, rslora, **factory)
                for e, (rank, alpha, max_rank) in enumerate(experts)
            )
        self.lora = nn.ModuleDict(updates)
        self.disabled = False  # DynamicLoRAModel.disable_adapter(): compute as the base module

    @property
    def merged(self) -> bool:
        return all(u.merged for u in self.updates())

    def updates(self) -> list[ExpertUpdate]:
        return [u for experts in self.lora.values() for u in experts]

    # --- forward -----------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        idle = not self.training and all(u.rank == 0 for u in self.updates())
        if self.merged or self.disabled or idle:
            return self.base_layer(*args, **kwargs)
        weights = {name: self.updated_weight(name) for name in self.lora}
        return torch.func.functional_call(self.base_layer, weights, args, kwargs)

    def updated_weight(self, name: str) -> torch.Tensor:
        """The parameter with every expert's update added, each at its active rank: ``W[e] + s_e B_e A_e``."""
        base = getattr(self.base_layer, name)
        experts = self.lora[name]
        if base.dim() == 2:
            updated = self._add(base, experts[0])
        else:
            updated = torch.stack([self._add(base[e], u) for e, u in enumerate(experts)])
        watching = [u for u in experts if u.watch is not None]
        if watching and updated.requires_grad:
            updated.register_hook(lambda g: self._measure(g, watching))
        return updated

    def _add(self, w: torch.Tensor, update: ExpertUpdate) -> torch.Tensor:
        # A training forward keeps a rank-0 update in the graph (an empty product): its parameters get zero
        # gradients, as a linear layer's do, so gradient averaging over processes needs no special case.
        if update.rank == 0 and not self.training:
            return w
        a, b = (f.to(w.dtype) for f in update.active_factors())
        left, right = (a.T, b.T) if self.transposed else (b, a)
        return torch.addmm(w, left, right, alpha=update.scaling)

    def _measure(self, grad: torch.Tensor, watching: list[ExpertUpdate]) -> None:
        for u in watching:
            if u.watch is not None:
                g = grad if grad.dim() == 2 else grad[u.expert]
                u.watch.add_weight_grad(g.T if self.transposed else g)

    # --- merge -------------------------------------------------------------------------------------------------

    def delta(self, name: str) -> torch.Tensor:
        """The parameter's update in its own layout (every expert's ``s_e B_e A_e``)."""
        deltas = [u.delta().T if self.transposed else u.delta() for u in self.lora[name]]
        return deltas[0] if getattr(self.base_layer, name).dim() == 2 else torch.stack(deltas)

    def check_mergeable(self) -> None:
        """Expert updates carry no input adaptation: always mergeable."""

    @torch.no_grad()
    def merge(self) -> None:
        """Add every update into its parameter; the forward pass then calls the base module directly."""
        if self.merged:
            return
        for name in self.lora:
            weight = getattr(self.base_layer, name)
            weight.add_(self.delta(name).to(weight.dtype))
        for u in self.updates():
            u.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for u in self.updates():
            u.merged = False
        for name in self.lora:
            weight = getattr(self.base_layer, name)
            weight.sub_(self.delta(name).to(weight.dtype))
