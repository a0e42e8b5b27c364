"""DynamicLoRAConfig: what to adapt, at which rank, and what else stays trainable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

INITS = ("lora", "gradient")


@dataclass
class DynamicLoRAConfig:
    """Configuration of a Dynamic LoRA adapter.

    Args:
        target_modules: which linear layers get an adapter. A list of names matches a module whose name equals an
            entry or ends with ``"." + entry`` (PEFT's rule, e.g. ``["query", "value"]``); a string is a regular
            expression that must match the whole module name. ``None`` picks the default for the model's family
            (see :data:`dynlora.targets.DEFAULT_TARGET_MODULES`).
        rank: initial rank of every adapted layer (the LoRA ``r``).
        alpha: LoRA alpha; each layer's update is scaled by ``alpha / rank`` (its initial rank).
        max_rank: capacity a layer can grow to when ranks are re-allocated (default: twice ``rank`` when
            re-allocating, else ``rank``).
        dropout: dropout probability on the adapter's input path.
        modules_to_save: extra modules (by name, same matching rule as ``target_modules``) kept fully trainable
            and saved with the adapter, such as a classification head. ``None`` picks the task head of
            ``*ForSequenceClassification``-style models (``classifier``, ``score``, ...); ``[]`` means none.
        rank_pattern: per-layer initial rank overrides, ``{name regex: rank}`` matched like PEFT's.
        alpha_pattern: per-layer alpha overrides, ``{name regex: alpha}``.

    Re-allocation (the Dynamic LoRA engine; see docs/method.md):

    Args:
        reallocate: move rank between layers during training (``False``: a static LoRA of the same layers).
        importance: layer/rank importance scorer: ``"sensitivity"`` (AdaLoRA's |θ·∇θ| with uncertainty),
            ``"gradient"`` (gradient norm, the paper's ∂L/∂W rule) or ``"update_norm"`` (‖s·B_i A_i‖).
        budget: total adapter parameters the allocation may use; ``None``: what the initial ranks use, i.e. the
            same budget as a static LoRA at ``rank``.
        min_rank: smallest rank a layer is shrunk to (0 lets a layer drop out; it can grow back).
        temperature: allocation sharpness τ: a layer's share of the budget ∝ score^(1/τ).
        max_rank_change: the most a layer's rank moves at one re-allocation (``None``: straight to its share).
            A bound makes the allocation follow the scores gradually, so one early, noisy decision cannot
            remove most of a layer's learned directions at once.
        warmup, interval, final: schedule. Scores accumulate from the first step; ranks are re-allocated at
            ``warmup``, ``warmup + interval``, ... up to ``final``, then frozen. A float in (0, 1) is a fraction of
            the total steps, an int a step count.
        beta1, beta2: EMA factors of the importance score and of its uncertainty.
        seed: seed of the random initialisation of components added when a layer grows.
        input_adaptive: input-feature-based adaptation (see gate.py): ``"mergeable"`` (running input statistics,
            folded into the weights at merge, zero inference cost), ``"per_example"`` (a per-token gate; cannot
            be merged or exported) or ``None`` (off, for ablations).
        input_norm_strength: how far ``"mergeable"`` evens out the input features' sizes: the scale is
            (rms_ref / rms_j)^strength, in (0, 1]; 1 makes every feature's typical size equal.
        init: where components start. ``"gradient"`` (default): along the top directions of the layer's loss
            gradient ∂L/∂W (probe.py), measured on the first training step for the initial components and on the
            re-allocation step for grown ones; on those steps it holds one float32 ``out × in`` matrix per
            adapted layer. ``"lora"``: A random (Kaiming-uniform), as LoRA. B is zero either way, so the adapter
            starts as a no-op.
    """

    target_modules: list[str] | str | None = None
    rank: int = 8
    alpha: float = 16.0
    max_rank: int | None = None
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    reallocate: bool = True
    importance: str = "sensitivity"
    budget: int | None = None
    min_rank: int = 1
    temperature: float = 1.0
    max_rank_change: int | None = None
    warmup: float | int = 0.1
    interval: float | int = 0.05
    final: float | int = 0.8
    beta1: float = 0.85
    beta2: float = 0.85
    seed: int = 0
    input_adaptive: str | None = "mergeable"
    input_norm_strength: float = 1.0
    init: str = "gradient"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.max_rank is not None and self.max_rank < self.rank:
            raise ValueError(f"max_rank ({self.max_rank}) must be >= rank ({self.rank})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.input_adaptive not in (None, "mergeable", "per_example"):
            raise ValueError(f"input_adaptive must be 'mergeable', 'per_example' or None, got {self.input_adaptive!r}")
        strength = self.input_norm_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"input_norm_strength must be in (0, 1], got {self.input_norm_strength!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}")
        if not 0 <= self.min_rank <= self.rank:
            raise ValueError(f"min_rank must be in [0, rank={self.rank}], got {self.min_rank}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_rank_change is not None and (isinstance(self.max_rank_change, bool)
                                                 or not isinstance(self.max_rank_change, int)
                                                 or self.max_rank_change < 1):  # fmt: skip
            raise ValueError(f"max_rank_change must be a whole number >= 1 (or None), got {self.max_rank_change!r}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be >= 0 parameters, got {self.budget}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup", "interval", "final"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ValueError(f"{name} must be a step count (int) or a fraction of training (float in [0, 1])")
            if isinstance(value, float) and value > 1:
                raise ValueError(f"{name}={value}: a float is a fraction of training (<= 1.0); an int is steps")

    @property
    def capacity(self) -> int:
        """Rank a layer can grow to: ``max_rank``, else twice ``rank`` when re-allocating, else ``rank``."""
        if self.max_rank is not None:
            return self.max_rank
        return 2 * self.rank if self.reallocate else self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DynamicLoRAConfig field(s): {', '.join(unknown)}")
        return cls(**data)
