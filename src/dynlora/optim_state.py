"""Keep an optimizer's per-parameter state consistent with a layer whose rank or basis changed.

The parameters stay the same objects, so the optimizer stays bound to them; when their storage is resized
(lowrank.py) :func:`fit_state` resizes their per-element state alike (leading components kept, new ones zero), and
the rows of A / columns of B of the changed components get their state fixed:

- re-basing (A' = T A, B' = B T⁻¹) maps gradients as ∂L/∂A' = T⁻ᵀ ∂L/∂A and ∂L/∂B' = ∂L/∂B Tᵀ. First moments
  (Adam's ``exp_avg``, SGD's ``momentum_buffer``) are linear in the gradient and are mapped exactly. Second moments
  (``exp_avg_sq``, ``max_exp_avg_sq``) are mapped through the element-wise squared matrices, which is exact when
  the map is a permutation or diagonal scaling and ignores cross terms otherwise.
- dropped components get zero state (they are inactive; if they grow back they start fresh).
- grown components get zero first moments and, for second moments, the mean of the layer's active entries: an
  Adam state of zero under a late, already bias-corrected step count would make their first updates ~3-6× larger
  than everyone else's for hundreds of steps.
Any other per-element state (an optimizer we do not know) is zeroed for the changed components. State that is not
per-element (a quantised optimizer's blocks, as bitsandbytes' 8-bit AdamW keeps) cannot follow a resize: the
parameter's state is then dropped and the optimizer starts it again at its next step.
"""

from __future__ import annotations

import torch

from .lowrank import LowRankUpdate, components, resized

LINEAR_KEYS = ("exp_avg", "momentum_buffer")
SQUARED_KEYS = ("exp_avg_sq", "max_exp_avg_sq")


def _buffers(optimizer: torch.optim.Optimizer | None, param: torch.Tensor):
    """(key, tensor) of the per-element state of ``param`` (same shape as the parameter)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [(k, v) for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape]


@torch.no_grad()
def fit_state(optimizer: torch.optim.Optimizer | None, layer: LowRankUpdate) -> None:
    """Give the state of the layer's rank-indexed parameters their parameters' current shapes (module doc)."""
    if optimizer is None:
        return
    for _, param, axis, _ in layer.rank_parameters():
        state = optimizer.state.get(param)
        if not state:
            continue
        stale = {
            k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == param.dim() and v.shape != param.shape
        }
        if not all(v.is_floating_point() and _others(v, axis) == _others(param, axis) for v in stale.values()):
            optimizer.state[param] = {}
            continue
        for key, value in stale.items():
            state[key] = resized(value, axis, param.shape[axis])


def _others(tensor: torch.Tensor, axis: int) -> list[int]:
    return [n for i, n in enumerate(tensor.shape) if i != axis]


@torch.no_grad()
def rebase_state(optimizer, layer: LowRankUpdate, t: torch.Tensor, t_inv: torch.Tensor) -> None:
    """Move the state of the active components into the basis of ``layer.rebase()`` (which returned t, t_inv)."""
    r = layer.rank
    for _, param, axis, side in layer.rank_parameters():
        # Gradients of "in"-side tensors (A) map by T⁻ᵀ, of "out"-side ones (B, gate) by T, along the rank axis.
        mix = t_inv.T if side == "in" else t
        for key, buf in _buffers(optimizer, param):
            view = components(buf, axis, 0, r)
            if key in LINEAR_KEYS:
                view.copy_(torch.tensordot(mix.to(buf.dtype), view, dims=1))
            elif key in SQUARED_KEYS:
                view.copy_(torch.tensordot(mix.square().to(buf.dtype), view, dims=1))
            else:
                view.zero_()


@torch.no_grad()
def clear_state(optimizer, layer: LowRankUpdate, start: int, stop: int) -> None:
    """Zero the state of components [start, stop) (dropped by a shrink)."""
    for _, param, axis, _ in layer.rank_parameters():
        for _, buf in _buffers(optimizer, param):
            components(buf, axis, start, stop).zero_()


@torch.no_grad()
def init_grown_state(optimizer, layer: LowRankUpdate, old: int, new: int) -> None:
    """State for components [old, new) that a growth just added (see the module doc)."""
    for _, param, axis, _ in layer.rank_parameters():
        for key, buf in _buffers(optimizer, param):
            grown = components(buf, axis, old, new)
            if key in SQUARED_KEYS and old > 0:
                grown.fill_(components(buf, axis, 0, old).mean())
            else:
                grown.zero_()
