"""DynamicLoRALinear: a frozen linear layer plus a low-rank update whose rank can change while training.

    y = W x + s · B[:, :r] A[:r] x,        s = alpha / r_init   (rsLoRA: alpha / √r_init)

The factors, their active rank and everything the engine does to them are :class:`~dynlora.lowrank.LowRankUpdate`'s
(lowrank.py); this layer applies the update to its inputs, with the optional input adaptation
(input_adaptation.py), and folds it into the base weight at merge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import INPUT_ADAPTATIONS
from .input_adaptation import InputNorm, TokenGate
from .lowrank import LowRankUpdate, adapter_dtype, components

__all__ = ["SUPPORTED_BASE_LAYERS", "DynamicLoRALinear", "components", "is_quantized", "layer_dims"]

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear (bitsandbytes' quantised ones included, whose weight is packed), or
    of a GPT-2 Conv1D, whose weight is stored as (in, out)."""
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes layer (Linear4bit, Linear8bitLt: a QLoRA base), recognised without importing bitsandbytes."""
    return type(module).__module__.startswith("bitsandbytes")


class DynamicLoRALinear(LowRankUpdate):
    """Wraps an ``nn.Linear`` (or GPT-2's transposed ``Conv1D``) with a LoRA update of changeable active rank.

    Args:
        base_layer: the frozen layer to adapt. Its weights are not copied.
        rank: initial active rank ``r`` (≥ 1); also fixes the scale ``alpha / rank``.
        alpha: LoRA alpha of this layer.
        max_rank: capacity, the largest rank the layer can grow to (default: ``rank``).
        dropout: dropout probability on the adapter's input path.
        input_adaptive: ``None``, ``"mergeable"`` or ``"per_example"`` input adaptation (see input_adaptation.py).
        input_norm_strength: exponent of the ``"mergeable"`` input scale, in (0, 1] (see input_adaptation.py).
        rslora: scale by ``alpha / sqrt(rank)`` (rsLoRA, Kalajdzievski 2023) instead of ``alpha / rank``.
    """

    kind = "linear"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        alpha: float,
        max_rank: int | None = None,
        dropout: float = 0.0,
        input_adaptive: str | None = None,
        input_norm_strength: float = 1.0,
        rslora: bool = False,
    ) -> None:
        if input_adaptive is not None and input_adaptive not in INPUT_ADAPTATIONS:
            raise ValueError(f"input_adaptive must be None or one of {INPUT_ADAPTATIONS}, got {input_adaptive!r}")
        if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"DynamicLoRALinear adapts nn.Linear or Conv1D, got {type(base_layer).__name__}")
        weight = base_layer.weight
        dtype = adapter_dtype(weight)
        in_features, out_features = layer_dims(base_layer)
        super().__init__(in_features, out_features, rank, alpha, max_rank, rslora, device=weight.device, dtype=dtype)
        self.base_layer = base_layer
        # Conv1D stores its weight as (in, out) and computes x @ W: the delta must be transposed to merge.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # none: no call per forward
        self.input_adaptive = input_adaptive
        if input_adaptive == "mergeable":
            self.input_norm = InputNorm(self.in_features, strength=input_norm_strength).to(weight.device)
        if input_adaptive == "per_example":
            self.token_gate = TokenGate(self.stored).to(device=weight.device, dtype=dtype)
        self.disabled = False  # DynamicLoRAModel.disable_adapter(): compute as the base layer

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models read it, e.g. for its dtype), as PEFT's LoRA layers expose it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # --- forward / merge ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # At rank 0 a training forward still runs the (empty) adapter path: its parameters stay in the graph with
        # zero gradients, so DDP and multi-process gradient averaging need no "unused parameters" handling.
        if self.merged or self.disabled or (self.rank == 0 and not self.training):
            return result
        a, b = self.active_factors()
        if self.input_norm is not None:
            if self.training:
                self.input_norm.observe(x)
            a = a * self.input_norm.scale().to(a.dtype)  # O(r·d) per step, not a pass over x
        h = F.linear((x if self.dropout is None else self.dropout(x)).to(a.dtype), a)
        if self.token_gate is not None:
            h = self.token_gate(h)
        if h.dtype == result.dtype:
            # One GEMM adds s·h·Bᵀ into the base output: no separate scale pass, no extra full-width tensor.
            out_2d = torch.addmm(result.reshape(-1, self.out_features), h.flatten(0, -2), b.t(), alpha=self.scaling)
            return out_2d.view_as(result)
        return result + (F.linear(h, b) * self.scaling).to(result.dtype)

    def check_mergeable(self) -> None:
        """A clear error when the update cannot be folded into the base weight."""
        if is_quantized(self.base_layer):
            raise RuntimeError(
                f"the base layer is a quantised {type(self.base_layer).__name__}: dynlora does not merge into "
                "quantised weights (rounding would change the update); export a PEFT adapter, or merge on the base "
                "loaded in full precision (dynlora merge does)"
            )
        self.mergeable_factors()

    def delta_weight(self) -> torch.Tensor:
        """The update ``s · B A_eff`` in the base weight's own layout ((in, out) for Conv1D)."""
        delta = self.delta()
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update into the base weight; the forward pass then skips the adapter."""
        if self.merged:
            return
        self.check_mergeable()
        weight = self.base_layer.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update from the base weight again."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, max_rank={self.max_rank}, "
            f"alpha={self.alpha:g}, merged={self.merged}, "
            f"input_adaptive={self.input_adaptive}"
        )
