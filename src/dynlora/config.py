"""DynamicLoRAConfig: what to adapt, at which rank, and what else stays trainable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
        max_rank: capacity a layer can grow to when ranks are re-allocated (default: ``rank``).
        dropout: dropout probability on the adapter's input path.
        modules_to_save: extra modules (by name, same matching rule as ``target_modules``) kept fully trainable
            and saved with the adapter, such as a classification head. ``None`` picks the task head of
            ``*ForSequenceClassification``-style models (``classifier``, ``score``, ...); ``[]`` means none.
        rank_pattern: per-layer initial rank overrides, ``{name regex: rank}`` matched like PEFT's.
        alpha_pattern: per-layer alpha overrides, ``{name regex: alpha}``.
    """

    target_modules: list[str] | str | None = None
    rank: int = 8
    alpha: float = 16.0
    max_rank: int | None = None
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynamicLoRAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DynamicLoRAConfig field(s): {', '.join(unknown)}")
        return cls(**data)
