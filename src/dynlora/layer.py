"""DynamicLoRALinear: a frozen linear layer plus a low-rank update whose rank can change while training.

    y = W x + s · B[:, :r] A[:r] x,        s = alpha / r_init   (rsLoRA: alpha / √r_init)

The factors, their active rank and everything the engine does to them are :class:`~dynlora.lowrank.LowRankUpdate`'s
(lowrank.py); this layer applies the update to its inputs, with the optional input adaptation
(input_adaptation.py), and folds it into the base weight at merge.

A LoRA-GA start (``init="lora-ga"``, probe.py) begins with s·B₀A₀ ≠ 0. So that the output starts unchanged, the base
weight then holds W − s·B₀A₀: the *offset*, whose factors the layer keeps (``offset_A``, ``offset_B``, saved with the
adapter) to put it back where the base model's own weight is meant, to apply it again to a freshly loaded base, and
to export: the change to the checkpoint's weight is s·(B A − B₀A₀), a PEFT LoRA of rank r + r₀ with factors
[A; A₀] and [s·B, −s·B₀]. With the adapter disabled the layer computes W x = (W − s·B₀A₀) x + s·B₀A₀ x.
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
        # A LoRA-GA start's offset of the base weight (module doc); None buffers are not part of the state dict.
        self.offset_A: torch.Tensor | None
        self.offset_B: torch.Tensor | None
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)

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
        if self.disabled and self.offset_A is not None:  # the base model's own weight: put the offset back
            offset = F.linear(F.linear(x.to(self.offset_A.dtype), self.offset_A), self.offset_B) * self.scaling
            return result + offset.to(result.dtype)
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

    # --- the base weight offset of a LoRA-GA start (module doc) -------------------------------------------------

    def reserve_offset(self, rank: int) -> None:
        """Make room for the offset of a LoRA-GA start of ``rank`` components (zero, so no offset, until
        :meth:`set_offset`): buffers, so that checkpoints and saved adapters carry it."""
        if is_quantized(self.base_layer):
            raise ValueError(
                "init='lora-ga' offsets the base weights, which a quantised (QLoRA) base cannot hold exactly; "
                "use init='gradient' (A along the gradient, B = 0, no offset) or a full-precision base"
            )
        like = self.lora_A
        self.offset_A = torch.zeros(rank, self.in_features, device=like.device, dtype=like.dtype)
        self.offset_B = torch.zeros(self.out_features, rank, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def set_offset(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Make the base weight hold W − s·b·a, in place of the offset it held (W itself when none)."""
        if self.offset_A is None or a.shape != self.offset_A.shape or b.shape != self.offset_B.shape:
            raise ValueError(f"an offset of shapes {tuple(a.shape)}, {tuple(b.shape)} does not fit this layer")
        if torch.equal(a.to(self.offset_A), self.offset_A) and torch.equal(b.to(self.offset_B), self.offset_B):
            return
        if self.merged:
            raise RuntimeError("cannot change the base weight offset of a merged layer: call unmerge() first")
        weight = self.base_layer.weight
        if type(weight).__name__ == "DTensor":
            raise RuntimeError("init='lora-ga' cannot offset a base weight sharded by FSDP; use init='gradient'")
        change = (self.offset_B @ self.offset_A - b.to(self.offset_B) @ a.to(self.offset_A)) * self.scaling
        weight.copy_((weight.float() + (change.T if self.fan_in_fan_out else change)).to(weight.dtype))
        self.offset_A.copy_(a)
        self.offset_B.copy_(b)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # A loaded offset must reach the base weight, not only the buffers (which the default loading then fills).
        a, b = state_dict.get(prefix + "offset_A"), state_dict.get(prefix + "offset_B")
        if self.offset_A is not None and torch.is_tensor(a) and torch.is_tensor(b):
            self.set_offset(a, b)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of the change to the checkpoint's weight, s·(B A − B₀A₀) with an offset (module doc)."""
        a, b = super().peft_factors()
        if self.offset_A is None:
            return a, b
        return torch.cat([a, self.offset_A.to(a)]), torch.cat([b, -self.scaling * self.offset_B.to(b)], dim=1)

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
