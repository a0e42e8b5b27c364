"""The loss gradient of a layer's full weight, ∂L/∂W, measured on the steps that need it, and its top directions.

A LoRA update ΔW = s·B·A can only move W inside the row space of A. The directions in which the loss falls
fastest are the top right singular vectors of G = ∂L/∂W = Σ_t g_t x_tᵀ (g_t the gradient of the layer's output
at token t, x_t its input): a component whose row A_i lies along one of them, with B_i = 0, changes nothing at
first, and its B_i receives the largest gradient any unit row could give it. dynlora starts components there
(``DynamicLoRAConfig.init = "gradient"``) rather than at a random row, which a short fine-tuning run cannot
afford to rotate into place (LoRA-GA, Wang et al. 2024; GoRA, He et al. 2025, use the same gradient).

LoRA-GA (``init = "lora-ga"``) starts both factors from G's SVD, G ≈ U S Vᵀ, so that the first steps of B·A move W
as a full fine-tuning step would: A = V[:, :r]ᵀ and B = ζ·U[:, r:2r]·diag(S[r:2r]) with ζ = out^¼ / √γ, γ = 16
(PEFT's ``LoraGAConfig`` defaults: direction ``ArB2r``, scale ``stable``). Then s·B·A ≠ 0 at the start, and the base
weight holds W − s·B₀A₀ so the output does not change (layer.py).

G is the gradient of the frozen weight, which backward otherwise never forms. A :class:`GradientProbe` is armed
for a step only (the first, and re-allocation steps): a forward hook then keeps a reference to the layer's input, and
a hook on its output adds gᵀx over the tokens that carry gradient (at most ``max_tokens`` of them) into one float32
``out × in`` matrix per layer (under torch.distributed summed over processes when read, so every process sees the
same G). Unarmed, it costs nothing.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .distributed import in_process_group
from .experts import ExpertUpdate


class GradientProbe:
    """Accumulates G = ∂L/∂W of one layer over the forwards/backwards of an armed step.

    Armed, it is a forward hook on the layer (attached from outside, as PEFT's EVA and LoRA-GA do): the layer's
    own forward stays the LoRA formula. Disarmed, the hook is removed."""

    def __init__(self, layer: nn.Module, max_tokens: int = 1024) -> None:
        self.layer = layer
        self.shape = (layer.out_features, layer.in_features)
        self.max_tokens = max_tokens
        self.weight_grad: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        """Measure from now on, starting afresh."""
        self.weight_grad = None
        if self._handle is None:
            self._handle = self.layer.register_forward_hook(self._watch)

    def disarm(self) -> None:
        self.weight_grad = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _watch(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
        """Training forwards only: adds gᵀx when backward reaches ``out``. An output that nothing trainable leads to
        (a layer at rank 0 below every trainable layer) becomes a leaf that requires grad, so the loss still sends
        it its gradient: every layer is measured, whatever is trainable around it."""
        if not (module.training and torch.is_grad_enabled()):
            return None
        x = inputs[0]
        replaced = None
        if not out.requires_grad:
            out = replaced = out.detach().requires_grad_()
        out.register_hook(lambda g: self._add(x, g))
        return replaced

    @torch.no_grad()
    def _add(self, x: torch.Tensor, g: torch.Tensor) -> None:
        flat_g, flat_x = g.reshape(-1, g.shape[-1]), x.detach().reshape(-1, x.shape[-1])
        # Only tokens the loss depends on carry gradient (not padding; in a last layer's query only the pooled
        # token), so keep those, then at most max_tokens of them (strided) to bound the cost.
        used = (flat_g != 0).any(dim=1).nonzero().squeeze(1)
        stride = max(1, -(-used.numel() // self.max_tokens))
        kept = used[::stride]
        # Scaled by used / kept, the sum over the kept tokens estimates the sum over all: LoRA-GA reads G's size.
        contribution = (flat_g[kept].float().T @ flat_x[kept].float()) * (used.numel() / max(1, kept.numel()))
        self.weight_grad = contribution if self.weight_grad is None else self.weight_grad + contribution


class ExpertProbe(GradientProbe):
    """The same measurement for one expert's update of a fused parameter (experts.py), which has no forward of its
    own: armed, the wrapper hands it ∂L/∂W[e] from the updated weight's gradient, which backward forms anyway."""

    @property
    def armed(self) -> bool:
        return self.layer.watch is self

    def arm(self) -> None:
        self.weight_grad = None
        self.layer.watch = self

    def disarm(self) -> None:
        self.weight_grad = None
        if self.layer.watch is self:
            self.layer.watch = None

    @torch.no_grad()
    def add_weight_grad(self, grad: torch.Tensor) -> None:
        g = grad.float()
        self.weight_grad = g.clone() if self.weight_grad is None else self.weight_grad + g


def make_probe(layer: nn.Module) -> GradientProbe:
    """The probe that measures ``layer``'s ∂L/∂W: an expert's update, or a layer with a forward."""
    return ExpertProbe(layer) if isinstance(layer, ExpertUpdate) else GradientProbe(layer)


@torch.no_grad()
def synced_gradients(probes: list[GradientProbe]) -> list[torch.Tensor | None]:
    """Each probe's G, averaged over processes under torch.distributed (one all-reduce for all layers), as the
    processes average their parameters' gradients; None for a layer that saw no gradient on any process. A
    collective: every process must call it."""
    if not in_process_group():
        return [p.weight_grad for p in probes]
    flat = torch.cat(
        [
            (
                p.weight_grad if p.weight_grad is not None else torch.zeros(p.shape, device=p.layer.lora_A.device)
            ).reshape(-1)
            for p in probes
        ]
    )
    seen = torch.tensor([float(p.weight_grad is not None) for p in probes], device=flat.device)
    both = torch.cat([flat, seen])
    torch.distributed.all_reduce(both)
    world = torch.distributed.get_world_size()
    out, offset = [], 0
    for probe, count in zip(probes, both[flat.numel() :].tolist(), strict=True):
        n = probe.shape[0] * probe.shape[1]
        out.append(both[offset : offset + n].view(probe.shape) / world if count > 0 else None)
        offset += n
    return out


@torch.no_grad()
def top_singular(g: torch.Tensor, k: int, iters: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets of ``g`` (``out × in``, float32): ``U [out, k]``, ``S [k]``, ``Vh [k, in]``.

    Randomised subspace iteration (Halko et al. 2011) with ``k + 8`` vectors from a fixed seed: ~4 ms for a
    384 × 384 layer where a full SVD takes ~30, and ≥ 98 % of the optimum's captured energy ‖G Vᵀ‖² even for a
    flat spectrum; deterministic, and the global RNG is left alone. A singular pair's sign is arbitrary; it is
    fixed (largest entry of each row of Vh positive), so that G and c·G give the same vectors."""
    width = min(k + 8, *g.shape)
    generator = torch.Generator(device=g.device).manual_seed(0)
    basis = torch.randn(g.shape[1], width, generator=generator, device=g.device)
    for _ in range(iters):
        basis, _ = torch.linalg.qr(g.T @ (g @ basis))
    u, s, vh = torch.linalg.svd(g @ basis, full_matrices=False)  # Rayleigh-Ritz in the found subspace
    u, s, vh = u[:, :k], s[:k], (vh @ basis.T)[:k]
    sign = vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)).sign()
    return u * sign.T, s, vh * sign


@torch.no_grad()
def top_directions(grad: torch.Tensor, k: int, taken: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` orthonormal rows (``k × in``): the top right singular vectors of ``grad`` (``out × in``), after
    projecting out the row space of ``taken`` (rows already in use), so new directions add to what is there."""
    g = grad.float()
    if taken is not None and taken.shape[0] > 0:
        q, _ = torch.linalg.qr(taken.T.to(g))  # in × r, orthonormal basis of the used row space
        g = g - (g @ q) @ q.T
    return top_singular(g, k)[2]


LORA_GA_GAMMA = 16.0  # PEFT LoraGAConfig's stable_gamma


@torch.no_grad()
def lora_ga_factors(grad: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's start (module doc) for a layer measured as ``grad`` (``out × in``): ``(A [rank, in], B [out,
    rank])``. A layer narrower than 2·rank has fewer than rank triplets past the first rank: the components left
    over get zero columns of B."""
    g = grad.float()
    u, s, vh = top_singular(g, min(2 * rank, *g.shape))  # rank <= min(out, in): at least rank triplets
    zeta = g.shape[0] ** 0.25 / LORA_GA_GAMMA**0.5
    b = torch.zeros(g.shape[0], rank, device=g.device)
    paired = s.numel() - rank  # triplets rank, ..., 2·rank - 1 that exist
    b[:, :paired] = u[:, rank:] * (zeta * s[rank:])
    return vh[:rank].contiguous(), b
