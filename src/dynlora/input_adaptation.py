"""Input-feature-based adaptation: the adapter's contribution adapts to the inputs it sees.

Two modes (``DynamicLoRAConfig.input_adaptive``), both starting as the identity so step 0 is plain LoRA:

``"mergeable"`` — :class:`InputNorm`. The adapter's input features are rescaled by running statistics of the
layer's input, g_j = rms_ref / rms_j with rms_j² an EMA of E[x_j²] over training tokens and rms_ref their median,
i.e. the adapter sees features of equal typical size while a typical feature keeps its own (a mean reference would
be dominated by the outliers and blow every other feature up). ``strength`` s in (0, 1] takes g^s instead: s = 1
equalises the features, s = 0.5 only halves their spread on a log scale. Training forwards only *accumulate* batch
statistics; they are committed once per optimizer step (``update_and_allocate``; under torch.distributed with one
all-reduce for all layers), so every forward of a step, including the recomputation of gradient checkpointing,
sees the same scale, and every process the same statistics. Transformer activations have a few outlier
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

import torch
from torch import nn

MODES = ("mergeable", "per_example")


class InputNorm(nn.Module):
    """Running per-feature RMS of a layer's input; :meth:`scale` is the per-feature factor for A's columns,
    (rms_ref / rms_j)^strength.

    Everything stays on the layer's device and nothing is read back to the host: training forwards add to a
    pending sum, the step's commit folds it in (a non-finite step is dropped by a mask, not a branch) and caches
    the scale, which the forwards until the next commit use as is."""

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
        self.pending_count = 0
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh())

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate a training batch (a strided subsample of at most ``max_tokens`` tokens)."""
        flat = x.detach().reshape(-1, x.shape[-1])
        flat = flat[:: max(1, flat.shape[0] // self.max_tokens)]
        self.pending_sum += flat.float().square().sum(dim=0)
        self.pending_count += flat.shape[0]

    @torch.no_grad()
    def commit(self, batch_mean_sq: torch.Tensor, valid: torch.Tensor | bool = True) -> None:
        """Fold one step's mean of x² into the running statistics; a non-finite (or not ``valid``) one is dropped."""
        batch = batch_mean_sq.to(self.mean_sq)
        keep = torch.isfinite(batch).all() & valid
        updated = torch.where(self.initialized, torch.lerp(self.mean_sq, batch, self.momentum), batch)
        self.mean_sq.copy_(torch.where(keep, updated, self.mean_sq))
        self.initialized.copy_(self.initialized | keep)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached scale from the statistics (after a commit or a load)."""
        ms = self.mean_sq + self.eps
        scale = (ms.median() / ms).pow(self.strength / 2)
        self.cached_scale.copy_(torch.where(self.initialized, scale, torch.ones_like(scale)))

    def scale(self) -> torch.Tensor:
        return self.cached_scale


def discard_statistics(norms: list[InputNorm]) -> None:
    """Forget the pending statistics of a step that was skipped (e.g. a non-finite loss)."""
    for norm in norms:
        norm.pending_sum.zero_()
        norm.pending_count = 0


@torch.no_grad()
def commit_statistics(norms: list[InputNorm]) -> None:
    """Commit every layer's pending statistics; under torch.distributed, averaged over processes in one
    all-reduce, so all processes keep identical statistics. Nothing is read back to the host."""
    if not norms:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = norms[0].pending_sum.device
        counts = torch.tensor([float(n.pending_count) for n in norms], device=device)
        packed = torch.cat([n.pending_sum for n in norms] + [counts])
        torch.distributed.all_reduce(packed)
        sums, totals = packed[: -len(norms)].split([n.pending_sum.numel() for n in norms]), packed[-len(norms) :]
        for norm, total_sum, total in zip(norms, sums, totals, strict=True):
            norm.commit(total_sum / total.clamp(min=1.0), valid=total > 0)
    else:
        for norm in norms:
            if norm.pending_count > 0:
                norm.commit(norm.pending_sum / norm.pending_count)
    discard_statistics(norms)


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
