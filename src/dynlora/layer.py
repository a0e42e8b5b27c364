"""DynamicLoRALinear: a frozen linear layer plus a low-rank update whose rank can change while training.

    y = W x + s · B[:, :r] A[:r] x,        s = alpha / r_init   (rsLoRA: alpha / √r_init)

A has a *capacity* of ``max_rank`` rows; only the first ``r`` (the *active rank*) take part. The active rank is
changed in place with :meth:`DynamicLoRALinear.set_rank`, so the module, the model and the optimizer's parameter
list stay the same objects (parameter shapes never change, which also keeps DDP's buckets valid), while the
forward pass slices the matrices: compute and memory traffic follow the active rank.

The scale ``s`` is fixed at construction from the *initial* rank, not the active one: growing the rank with zero
columns of B must leave the output unchanged, which a scale of ``alpha / r_active`` would break.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .input_adaptation import MODES, InputNorm, TokenGate

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


def components(tensor: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """View of rank components [start, stop) of a rank-indexed tensor (parameter or optimizer state), rank axis
    first."""
    return tensor.movedim(axis, 0)[start:stop]


class DynamicLoRALinear(nn.Module):
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
        super().__init__()
        if input_adaptive is not None and input_adaptive not in MODES:
            raise ValueError(f"input_adaptive must be None or one of {MODES}, got {input_adaptive!r}")
        if not isinstance(base_layer, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"DynamicLoRALinear adapts nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        # Conv1D stores its weight as (in, out) and computes x @ W: the delta must be transposed to merge.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        weight = base_layer.weight
        self.in_features, self.out_features = layer_dims(base_layer)
        max_rank = rank if max_rank is None else max_rank
        limit = min(self.in_features, self.out_features)
        if not 1 <= rank <= max_rank <= limit:
            raise ValueError(
                f"need 1 <= rank ({rank}) <= max_rank ({max_rank}) <= min(in, out) ({limit}) "
                f"for a {self.in_features}x{self.out_features} layer"
            )
        self.max_rank = max_rank
        self.initial_rank = rank
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters stay float32 on a half-precision base (as PEFT's autocast_adapter_dtype): their updates are small.
        half = weight.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if half or not weight.is_floating_point() else weight.dtype
        factory = {"device": weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(max_rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, max_rank, **factory))
        self.input_adaptive = input_adaptive
        mergeable, per_example = input_adaptive == "mergeable", input_adaptive == "per_example"
        self.input_norm = (
            InputNorm(self.in_features, strength=input_norm_strength).to(weight.device) if mergeable else None
        )
        self.token_gate = TokenGate(max_rank).to(**factory) if per_example else None
        self.merged = False
        self.disabled = False  # DynamicLoRAModel.disable_adapter(): compute as the base layer
        self.reset_parameters()

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (models read it, e.g. for its dtype), as PEFT's LoRA layers expose it."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_parameters(self) -> None:
        """Standard LoRA init: A Kaiming-uniform (as nn.Linear), B zero, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- active rank -------------------------------------------------------------------------------------------

    def set_rank(self, rank: int, generator: torch.Generator | None = None, *, init_new: bool = True) -> None:
        """Change the active rank in place.

        Growing re-initialises the new rows of A (Kaiming-uniform, drawn from ``generator`` when given) and zeroes
        the new columns of B, so the layer's output does not change at the moment of growth. Shrinking drops the
        trailing components; put the least important ones last first (see the allocator). ``init_new=False``
        only moves the boundary: for restoring a rank whose rows were loaded from a full-capacity state dict.
        """
        if self.merged:
            raise RuntimeError("cannot change the rank of a merged layer: call unmerge() first")
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside [0, max_rank={self.max_rank}]")
        old = self.rank
        if rank > old and init_new:
            with torch.no_grad():
                bound = 1.0 / math.sqrt(self.in_features)  # what kaiming_uniform_(a=sqrt(5)) gives
                new_rows = torch.empty(rank - old, self.in_features, dtype=torch.float32, device="cpu")
                new_rows.uniform_(-bound, bound, generator=generator)
                self.lora_A[old:rank].copy_(new_rows)
                self.lora_B[:, old:rank].zero_()
                if self.token_gate is not None:
                    self.token_gate.weight[old:rank].zero_()
        self.rank = rank

    @torch.no_grad()
    def point_components(self, start: int, directions: torch.Tensor) -> None:
        """Start components ``start, start + len(directions)`` along ``directions`` (unit rows in the input space):
        their effective rows of A (input scale included) get these directions at the norm of a default LoRA row,
        their columns of B zero, so the layer's output does not change."""
        stop = start + directions.shape[0]
        if not 0 <= start <= stop <= self.rank:
            raise ValueError(f"components [{start}, {stop}) are not all active (rank {self.rank})")
        rows = directions.float() / math.sqrt(3.0)  # a Kaiming-uniform row of A has norm sqrt(1/3)
        if self.input_norm is not None:
            rows = rows / self.input_norm.scale()  # so that A_eff = A·diag(g) has them
        self.lora_A[start:stop].copy_(rows.to(self.lora_A))
        self.lora_B[:, start:stop].zero_()
        if self.token_gate is not None:
            self.token_gate.weight[start:stop].zero_()

    def effective_rows(self) -> torch.Tensor:
        """Rows of A as the input sees them (input scale included), active part only."""
        a = self.active_factors()[0]
        return a * self.input_norm.scale().to(a.dtype) if self.input_norm is not None else a

    @torch.no_grad()
    def rebase(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-express the active update in its singular basis, strongest direction first, without changing it.

        With A = R_aᵀ Q_aᵀ and B = Q_b R_b (two thin QRs) the update is Q_b (R_b R_aᵀ) Q_aᵀ; the SVD of the small
        r×r core, U Σ Vᵀ, gives A' = Vᵀ Q_aᵀ (orthonormal rows) and B' = Q_b U Σ. Then B'A' = BA, and keeping the
        first k components is the best rank-k approximation of the update (Eckart–Young), so shrinking afterwards
        drops the weakest directions. Cost: O((in + out) r²).

        Returns ``(T, T_inv)`` with A' = T A and B' = B T_inv, for moving optimizer state into the new basis.
        """
        a, b = self.active_factors()
        # Float64 for these small factorisations (in × r, out × r, r × r; re-allocation steps only): in float32 an
        # ill-conditioned core loses digits that BA itself does not have, and the output would move.
        qa, ra = torch.linalg.qr(a.T.double())
        qb, rb = torch.linalg.qr(b.double())
        u, sigma, vh = torch.linalg.svd(rb @ ra.T)
        a.copy_((vh @ qa.T).to(a.dtype))
        b.copy_((qb @ u * sigma).to(b.dtype))
        # A' = Vᵀ R_a⁻ᵀ A; pinv keeps this defined for a rank-deficient A (then the map is only used approximately).
        t = vh @ torch.linalg.pinv(ra.T)
        t_inv = ra.T @ vh.T
        if self.token_gate is not None:  # w·h = (T⁻ᵀ w)·(T h): the gate sees the same value in the new basis
            w = self.token_gate.weight[: self.rank]
            w.copy_((t_inv.T @ w.double()).to(w.dtype))
        return t.float(), t_inv.float()

    def rank_parameters(self) -> list[tuple[str, nn.Parameter, int, str]]:
        """Parameters indexed by rank component: (name, parameter, rank axis, side). Under a re-basis with
        A' = T A, "in"-side tensors (A) map by T⁻ᵀ along the axis, "out"-side ones (B, the token gate) by T."""
        params = [("lora_A", self.lora_A, 0, "in"), ("lora_B", self.lora_B, 1, "out")]
        if self.token_gate is not None:
            params.append(("token_gate.weight", self.token_gate.weight, 0, "out"))
        return params

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A[:r], B[:, :r]): views of the active part, no copy."""
        r = self.rank
        if r == self.max_rank:
            return self.lora_A, self.lora_B
        return self.lora_A[:r], self.lora_B[:, :r]

    def active_parameters(self) -> int:
        """Number of trainable adapter parameters that take part at the current rank (gate included)."""
        gate = self.rank + 1 if self.token_gate is not None else 0
        return self.rank * (self.in_features + self.out_features) + gate

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
        h = F.linear(self.dropout(x).to(a.dtype), a)
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

    def mergeable_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B) with the mergeable input scale folded into A; an error for a per-example gate."""
        if self.token_gate is not None:
            raise RuntimeError(
                "this layer has a per_example input gate, which depends on each input and cannot be folded into a "
                "weight; merge/export need input_adaptive='mergeable' or None"
            )
        return self.effective_rows(), self.active_factors()[1]

    def delta_weight(self) -> torch.Tensor:
        """The update ``s · B A_eff`` in the base weight's own layout ((in, out) for Conv1D)."""
        a, b = self.mergeable_factors()
        delta = (b @ a) * self.scaling
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
