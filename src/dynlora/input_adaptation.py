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
    (rms_ref / rms_j)^strength."""

    def __init__(
        self, in_features: int, momentum: float = 0.01, max_tokens: int = 512, eps: float = 1e-6, strength: float = 1.0
    ) -> None:
        super().__init__()
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"input norm strength must be in (0, 1], got {strength}")
        self.momentum, self.max_tokens, self.eps, self.strength = momentum, max_tokens, eps, strength
        self.register_buffer("mean_sq", torch.ones(in_features))
        self.register_buffer("initialized", torch.tensor(False))
        # Statistics of this step's forwards, not yet committed (not part of the saved state).
        self.pending_sum = torch.zeros(in_features)
        self.pending_count = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate a training batch (a strided subsample of at most ``max_tokens`` tokens)."""
        flat = x.detach().reshape(-1, x.shape[-1])
        flat = flat[:: max(1, flat.shape[0] // self.max_tokens)]
        self.pending_sum += flat.float().square().sum(dim=0).cpu()
        self.pending_count += flat.shape[0]

    @torch.no_grad()
    def commit(self, batch_mean_sq: torch.Tensor) -> None:
        """Fold one step's mean of x² into the running statistics; a non-finite one is dropped."""
        if not torch.isfinite(batch_mean_sq).all():
            return
        batch = batch_mean_sq.to(self.mean_sq)
        if bool(self.initialized):
            self.mean_sq.lerp_(batch, self.momentum)
        else:
            self.mean_sq.copy_(batch)
            self.initialized.fill_(True)

    def scale(self) -> torch.Tensor:
        if not bool(self.initialized):
            return torch.ones_like(self.mean_sq)
        ms = self.mean_sq + self.eps
        return (ms.median() / ms).pow(self.strength / 2)


def discard_statistics(norms: list[InputNorm]) -> None:
    """Forget the pending statistics of a step that was skipped (e.g. a non-finite loss)."""
    for norm in norms:
        norm.pending_sum.zero_()
        norm.pending_count = 0


@torch.no_grad()
def commit_statistics(norms: list[InputNorm]) -> None:
    """Commit every layer's pending statistics; under torch.distributed, averaged over processes in one
    all-reduce, so all processes keep identical statistics."""
    if not norms:
        return
    sums = torch.cat([n.pending_sum for n in norms] + [torch.tensor([float(n.pending_count) for n in norms])])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    counts = sums[-len(norms) :]
    offset = 0
    for norm, count in zip(norms, counts.tolist(), strict=True):
        width = norm.pending_sum.numel()
        if count > 0:
            norm.commit(sums[offset : offset + width] / count)
        norm.pending_sum.zero_()
        norm.pending_count = 0
        offset += width


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
