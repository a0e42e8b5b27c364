"""LowRankUpdate: the factors of one low-rank weight update whose rank can change while training.

    ΔW = s · B[:, :r] A_eff[:r],        A_eff = A · diag(g)  (g: an input scale, when there is one),
    s = alpha / r_init                  (rsLoRA: alpha / √r_init)

A and B have a *capacity* of ``max_rank`` components; only the first ``r`` (the *active rank*) take part. The
rank is changed in place with :meth:`LowRankUpdate.set_rank`: the module, the model and the optimizer's parameter
list stay the same objects. What the factors *store* is the active part only (A ``[r, in]``, B ``[out, r]``): so
the forward reads whole contiguous tensors, and the backward, gradients and optimizer (AdamW over every element)
cost what rank ``r`` costs, not the capacity. Re-allocation resizes the stored parameters (same Parameter objects,
new data) and the engine resizes their optimizer state with them (optim_state.py). Inactive components hold
nothing worth keeping: a dropped one is gone, a grown one starts afresh. Under torch.distributed the factors store
the whole capacity instead and users slice them, because DDP fixes every parameter's shape when it wraps the model
(:func:`~dynlora.distributed.launched_distributed`, decided when the update is built).

The scale ``s`` is fixed at construction from the *initial* rank, not the active one: growing the rank with zero
columns of B must leave the update unchanged, which a scale of ``alpha / r_active`` would break.

This is everything the engine touches (rank, basis, importance, optimizer state). Where the update is applied is
the subclass's or the owner's business: :class:`~dynlora.layer.DynamicLoRALinear` adds it to a linear layer's
output, :class:`~dynlora.experts.DynamicLoRAParameters` to one expert's slice of a fused expert weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .distributed import launched_distributed


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Factors stay float32 on a half-precision (or quantised) base, as PEFT's autocast_adapter_dtype: their updates
    are small."""
    half = weight.dtype in (torch.float16, torch.bfloat16)
    return torch.float32 if half or not weight.is_floating_point() else weight.dtype


def components(tensor: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """View of rank components [start, stop) of a rank-indexed tensor (parameter or optimizer state), rank axis
    first."""
    return tensor.movedim(axis, 0)[start:stop]


def resized(tensor: torch.Tensor, axis: int, count: int) -> torch.Tensor:
    """``tensor`` with ``count`` rank components along ``axis``: its leading ones, then zeros."""
    shape = list(tensor.shape)
    shape[axis] = count
    out = tensor.new_zeros(shape)
    kept = min(count, tensor.shape[axis])
    components(out, axis, 0, kept).copy_(components(tensor, axis, 0, kept))
    return out


class LowRankUpdate(nn.Module):
    """The factors A ``[r, in]`` and B ``[out, r]`` of one update, at a changeable active rank ``r`` of at most
    ``max_rank`` (stored at ``max_rank`` under torch.distributed: module doc).

    Args:
        in_features, out_features: the updated weight is ``out × in``.
        rank: initial active rank ``r`` (≥ 1); also fixes the scale ``alpha / rank``.
        alpha: LoRA alpha of this update.
        max_rank: capacity, the largest rank the update can grow to (default: ``rank``).
        rslora: scale by ``alpha / sqrt(rank)`` (rsLoRA, Kalajdzievski 2023) instead of ``alpha / rank``.
        device, dtype: of the factors.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        max_rank: int | None = None,
        rslora: bool = False,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        max_rank = rank if max_rank is None else max_rank
        limit = min(self.in_features, self.out_features)
        if not 1 <= rank <= max_rank <= limit:
            raise ValueError(
                f"need 1 <= rank ({rank}) <= max_rank ({max_rank}) <= min(in, out) ({limit}) "
                f"for a {self.in_features}x{self.out_features} weight"
            )
        self.max_rank = max_rank
        self.initial_rank = rank
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(max_rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, max_rank, device=device, dtype=dtype))
        self.merged = False  # the update is folded into its base weight: the rank must not change
        # Optional input adaptation (input_adaptation.py): set by a subclass that sees the update's inputs.
        self.input_norm: nn.Module | None = None
        self.token_gate: nn.Module | None = None
        self.reset_parameters()  # the whole capacity is drawn, so the random stream is the same in both layouts
        self.keeps_capacity = launched_distributed()  # module doc: DDP needs fixed shapes
        self.store(self.stored_rank(rank))

    def reset_parameters(self) -> None:
        """Standard LoRA init: A Kaiming-uniform (as nn.Linear), B zero, so the update starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- active rank and storage ---------------------------------------------------------------------------------

    @property
    def stored(self) -> int:
        """Rank components the parameters hold (``rank <= stored <= max_rank``)."""
        return self.lora_A.shape[0]

    def stored_rank(self, rank: int) -> int:
        """What the parameters hold at active rank ``rank``: the rank itself, or the capacity (module doc)."""
        return self.max_rank if self.keeps_capacity else rank

    @torch.no_grad()
    def store(self, count: int) -> None:
        """Make every rank-indexed parameter (and its gradient) hold ``count`` components: the leading ones kept,
        new ones zero. The parameters stay the same objects; their optimizer state follows with
        :func:`~dynlora.optim_state.fit_state`."""
        for _, param, axis, _ in self.rank_parameters():
            if param.shape[axis] != count:
                data, grad = resized(param.data, axis, count), param.grad
                param.grad = None
                # Autograd caches a parameter's gradient accumulator with its shape while any graph holds it (a
                # loss the training loop kept); new data of another shape alone does not renew it, of another
                # dtype does.
                param.data = data.new_empty(0, dtype=torch.float16 if data.dtype != torch.float16 else torch.float32)
                param.data = data
                if grad is not None:
                    param.grad = resized(grad, axis, count)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # A state dict holds the factors as stored when it was written (the active rank, or the whole capacity):
        # take that storage, so that the rank can then be restored from the engine's state.
        incoming = state_dict.get(prefix + "lora_A")
        if torch.is_tensor(incoming) and incoming.dim() == 2 and incoming.shape[0] <= self.max_rank:
            self.store(incoming.shape[0])
            self.rank = min(self.rank, incoming.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_rank(self, rank: int, generator: torch.Generator | None = None, *, init_new: bool = True) -> None:
        """Change the active rank in place.

        Growing re-initialises the new rows of A (Kaiming-uniform, drawn from ``generator`` when given) and zeroes
        the new columns of B, so the update does not change at the moment of growth. Shrinking drops the
        trailing components; put the least important ones last first (see the allocator). ``init_new=False``
        only moves the boundary: for restoring a rank whose rows were loaded from a state dict. The optimizer
        state of the resized parameters must follow (:func:`~dynlora.optim_state.fit_state`).
        """
        if self.merged:
            raise RuntimeError("cannot change the rank of a merged layer: call unmerge() first")
        if not 0 <= rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside [0, max_rank={self.max_rank}]")
        old = self.rank
        self.store(self.stored_rank(rank))
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
        their columns of B zero, so the update does not change."""
        zeros = directions.new_zeros(self.out_features, directions.shape[0])
        self.set_components(start, directions.float() / math.sqrt(3.0), zeros)  # a Kaiming-uniform row: norm √(1/3)

    @torch.no_grad()
    def set_components(self, start: int, a_eff: torch.Tensor, b: torch.Tensor) -> None:
        """Components ``start, start + len(a_eff)``: their effective rows of A (input scale included, as
        :meth:`effective_rows`) and their columns of B; their token gate weights zero."""
        stop = start + a_eff.shape[0]
        if not 0 <= start <= stop <= self.rank:
            raise ValueError(f"components [{start}, {stop}) are not all active (rank {self.rank})")
        if b.shape != (self.out_features, stop - start):
            raise ValueError(f"columns of B of shape {tuple(b.shape)} for components [{start}, {stop})")
        rows = a_eff.float() / self.input_norm.scale() if self.input_norm is not None else a_eff  # A_eff = A·diag(g)
        self.lora_A[start:stop].copy_(rows.to(self.lora_A))
        self.lora_B[:, start:stop].copy_(b.to(self.lora_B))
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
        if r == self.stored:
            return self.lora_A, self.lora_B
        return self.lora_A[:r], self.lora_B[:, :r]

    def active_parameters(self) -> int:
        """Number of trainable adapter parameters that take part at the current rank (gate included)."""
        gate = self.rank + 1 if self.token_gate is not None else 0
        return self.rank * (self.in_features + self.out_features) + gate

    # --- the update as a weight ----------------------------------------------------------------------------------

    def mergeable_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B) with the mergeable input scale folded into A; an error for a per-example gate."""
        if self.token_gate is not None:
            raise RuntimeError(
                "this layer has a per_example input gate, which depends on each input and cannot be folded into a "
                "weight; merge/export need input_adaptive='mergeable' or None"
            )
        return self.effective_rows(), self.active_factors()[1]

    def delta(self) -> torch.Tensor:
        """The update ``s · B A_eff``, ``out × in``."""
        a, b = self.mergeable_factors()
        return (b @ a) * self.scaling

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``B A`` the whole change this update makes to the weight as the base model's checkpoint
        holds it, scale included: what a PEFT adapter stores."""
        a, b = self.mergeable_factors()
        return a, b * self.scaling
