"""Input-feature-based adaptation: the adapter's contribution adapts to the inputs it sees.

Two modes (``DynamicLoRAConfig.input_adaptive``), both starting as the identity so step 0 is plain LoRA:

``"mergeable"`` — :class:`InputNorm`. The adapter's input features are rescaled by running statistics of the
layer's input, g_j = rms_ref / rms_j with rms_j² an EMA of E[x_j²] over training tokens and rms_ref their median,
i.e. the adapter sees features of equal typical size while a typical feature keeps its own (a mean reference would
be dominated by the outliers and blow every other feature up). ``strength`` s in (0, 1] takes g^s instead: s = 1
equalises the features, s = 0.5 only halves their spread on a log scale. Training forwards only *accumulate* batch
statistics. After each optimizer step (``update_and_allocate``) they join the block of steps not yet folded in,
and every ``every`` steps (``DynamicLoRAConfig.input_norm_every``; and after the first step) the block is folded
into the average at once, rms² ← lerp(rms², block mean, 1 − (1 − m)^n) for a block of n steps: the time constant
of n per-step updates at 1/n of their cost. Under torch.distributed each step's statistics are summed over
processes (one all-reduce for all layers) before they join the block. So every forward between two folds,
including the recomputation of gradient checkpointing, sees the same scale, and every process the same
statistics. Checkpoints and saved adapters carry the block, so training continues from them
exactly; merge and export use the average only. Transformer activations have a few outlier
features orders of magnitude larger than the rest; without this they dominate A x and so which directions the
adapter can learn. The scale is applied to A, not x (A_eff = A·diag(g): O(r·d) per step instead of O(d) per
token), only changes in training (statistics are frozen in eval), and folds into A at merge/export: zero
inference cost. It acts on the input side, so re-basing or resizing the rank space does not interact with it.

``"per_example"`` — :class:`TokenGate`. Each token t gets a gate on the whole adapter path from its own rank-space
features h_t = A x_t: g_t = 2σ(w·h_t + b), the adapter output becoming s·B (g_t h_t). O(r) per token. Under a
change of rank basis h' = T h it maps exactly (w' = T⁻ᵀ w) and grown components enter with w_i = 0. It depends on
each input, so it cannot be merged into a weight: ``merge_and_unload()`` and ``export_peft()`` refuse it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn


class InputNorm(nn.Module):
    """Running per-feature RMS of a layer's input; :meth:`scale` is the per-feature factor for A's columns,
    (rms_ref / rms_j)^strength.

    Everything stays on the layer's device and nothing is read back to the host: training forwards add to a
    pending sum, each step's commit (:class:`InputStatistics`, for all layers at once) moves it into the block, a
    fold merges the block into the average (a non-finite block is dropped by a mask, not a branch) and caches the
    scale, which the forwards until the next fold use as is."""

    # Statistics gathered since the last fold: saved with the rest so training continues exactly from a checkpoint
    # or a saved adapter; absent (states written before dynlora kept them) means empty.
    TRAINING_STATE = ("block_sum", "block_count")

    @classmethod
    def is_unfolded(cls, key: str) -> bool:
        """Whether a state-dict key holds statistics not folded in yet (states written before dynlora kept them
        lack these keys, and load as an empty block)."""
        return ".input_norm." in key and key.rsplit(".", 1)[-1] in cls.TRAINING_STATE

    def __init__(
        self, in_features: int, momentum: float = 0.01, max_tokens: int = 512, eps: float = 1e-6, strength: float = 1.0
    ) -> None:
        super().__init__()
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"input norm strength must be in (0, 1], got {strength}")
        self.momentum, self.max_tokens, self.eps, self.strength = momentum, max_tokens, eps, strength
        self.register_buffer("mean_sq", torch.ones(in_features))
        self.register_buffer("initialized", torch.tensor(False))
        # This step's forwards' statistics, not yet committed, and the scale they give: not part of the saved state.
        self.register_buffer("pending_sum", torch.zeros(in_features), persistent=False)
        self.register_buffer("cached_scale", torch.ones(in_features), persistent=False)
        self.pending_tokens = _Tally()  # a plain counter: nn.Module's attribute setter is slow per forward
        self.register_buffer("block_sum", torch.zeros(in_features))
        self.register_buffer("block_count", torch.zeros(()))
        self.register_load_state_dict_pre_hook(_empty_block_when_absent)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())
        self.register_state_dict_post_hook(_own_storage)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate a training batch (a strided subsample of at most ``max_tokens`` tokens). Layers that read the
        same input (q/k/v, gate/up) share one reduction, computed for the first of them; under torch.compile each
        layer computes its own, since the check that an input is the same tensor would break the graph."""
        if torch.compiler.is_compiling():
            total, tokens = _square_sum(x, self.max_tokens)
        else:
            seen = _LAST_INPUT
            if (
                seen.of is None
                or seen.of() is not x
                or (seen.version, seen.max_tokens) != (x._version, self.max_tokens)
            ):
                seen.of, seen.version, seen.max_tokens = weakref.ref(x), x._version, self.max_tokens
                seen.sum, seen.tokens = _square_sum(x, self.max_tokens)
            total, tokens = seen.sum, seen.tokens
        self.pending_sum += total
        self.pending_tokens.value += tokens

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached scale from the statistics (after a load)."""
        self.cached_scale.copy_(feature_scales(self.mean_sq[None], self.initialized[None], self.eps, self.strength)[0])

    def scale(self) -> torch.Tensor:
        return self.cached_scale


class _Tally:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


def _square_sum(x: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Σ x² per feature over a strided subsample of at most ``max_tokens`` of x's tokens, and the tokens taken."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] >= 2 * max_tokens:
        flat = flat[:: flat.shape[0] // max_tokens]
    return flat.float().square().sum(dim=0), flat.shape[0]


class _LastInput:
    """The last input observed and its reduction (``sum`` of x² over ``tokens`` tokens), held by a weak reference:
    the same tensor object, unchanged since (its version), gives the same reduction."""

    __slots__ = ("of", "version", "max_tokens", "sum", "tokens")

    def __init__(self) -> None:
        self.of: weakref.ref | None = None
        self.version = self.max_tokens = self.tokens = 0
        self.sum: torch.Tensor | None = None


_LAST_INPUT = _LastInput()


def _empty_block_when_absent(module: InputNorm, state_dict: dict, prefix: str, *_args) -> None:
    for key in InputNorm.TRAINING_STATE:
        state_dict.setdefault(prefix + key, torch.zeros_like(getattr(module, key)))


def _own_storage(module: InputNorm, state_dict: dict, prefix: str, _metadata) -> None:
    # Grouped buffers are views of rows of one tensor (InputStatistics); torch.save would write a view's whole
    # storage, every layer's rows, so a state dict gets tensors of its own.
    for name in module._buffers:
        if prefix + name in state_dict:  # the persistent ones
            state_dict[prefix + name] = state_dict[prefix + name].clone()


def feature_scales(mean_sq: torch.Tensor, initialized: torch.Tensor, eps: float, strength: float) -> torch.Tensor:
    """Per-feature scales ``[n, d]`` of ``n`` layers' statistics: (median rms² / rms²)^(s/2), 1 before any."""
    ms = mean_sq + eps
    scale = (ms.median(dim=1, keepdim=True).values / ms).pow(strength / 2)
    return torch.where(initialized[:, None], scale, torch.ones_like(scale))


class TokenGate(nn.Module):
    """g_t = 2σ(w·h_t + b) per token on the rank-space features; w = 0, b = 0 at init (g = 1)."""

    def __init__(self, max_rank: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_rank))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = h.shape[-1]
        gate = 2.0 * torch.sigmoid(h @ self.weight[:r].to(h.dtype) + self.bias.to(h.dtype))
        return h * gate.unsqueeze(-1)
