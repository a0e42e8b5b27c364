"""DynamicLoRAConfig: what to adapt, at which rank, and how the engine moves rank between layers.

This dataclass is the one declaration of every adapter setting: the ``dynlora`` command builds its flags from its
fields (name, type, default and ``help``), a ``--config`` file is typed from them, static LoRA is derived from it
with :func:`dataclasses.replace`, and the PEFT baselines read rank, alpha, dropout and targets from it. Adding a
setting is one field here plus its check in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ALL_LINEAR = "all-linear"  # target_modules: every linear layer (PEFT's name)
INITS = ("lora", "gradient", "lora-ga")
IMPORTANCES = ("sensitivity", "gradient", "update_norm")
SHARES = ("rank", "parameter")
INPUT_ADAPTATIONS = ("mergeable", "per_example")
NORM_SETTINGS = ("input_norm_strength", "input_norm_every")  # what tunes the mergeable input adaptation


def setting(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with its help text (PEFT's ``field(metadata={"help": ...})``); ``extra`` goes into the
    metadata too: ``flag="--schedule-warmup"`` where the command-line name differs from the field's, ``choices``
    for a string with a fixed set of values, and tags (:func:`tagged`): ``engine=True`` for a setting only Dynamic
    LoRA's engine uses, ``every_method=True`` for one every method reads (PEFT's baselines too), ``schedule=True`` for
    one of the re-allocation schedule (PEFT's AdaLoRA prunes on it too), ``run_only=True`` for a run setting that
    does not change what the run computes, ``length=True`` for one that sets how long it trains."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class DynamicLoRAConfig:
    """Configuration of a Dynamic LoRA adapter; every field's ``help`` says what it does (``dynlora train --help``
    prints them). docs/method.md derives the engine's rules. Fields marked ``engine`` act only in Dynamic LoRA's
    engine: static LoRA (:func:`static_lora`) ignores them."""

    target_modules: list[str] | str | None = setting(
        None,
        "layers to adapt: module names matched as PEFT does (an entry equals the name or its last parts; "
        "gate_up_proj, experts or gate name a mixture of experts' fused experts and router), all-linear (every "
        "linear layer but the output layer, and every expert and router), or one regex for the whole name; "
        "default: the attention projections of the model's family (and a mixture's experts; dynlora train on a "
        "language model: all-linear)",
        every_method=True,
    )
    rank: int = setting(
        8, "initial rank of every adapted layer (LoRA's r); it also fixes the budget", every_method=True
    )
    alpha: float = setting(
        16.0,
        "LoRA alpha: each layer's update is scaled by alpha / its initial rank (alpha / its root with rslora)",
        every_method=True,
    )
    rslora: bool = setting(
        False,
        "scale each layer's update by alpha / sqrt(its initial rank), rsLoRA's scale, instead of alpha / rank: the "
        "update no longer shrinks as 1/r (for dynlora's methods; PEFT's is --method peft-rslora)",
    )
    max_rank: int | None = setting(None, "rank a layer can grow to (default: 2 x rank when re-allocating, else rank)")
    dropout: float = setting(0.0, "dropout probability on the adapter's input path", every_method=True)
    modules_to_save: list[str] | None = setting(
        None,
        "extra modules kept fully trainable and saved with the adapter; default: the task head of a "
        "classification model; an empty list: none",
        every_method=True,
    )
    train_untrained_pooler: bool = setting(
        True,
        "with the default modules_to_save: also train a pooler the checkpoint never trained (all-zero bias, as a "
        "sentence-transformers model ships it), which a frozen head would read almost constant features through",
        every_method=True,
    )
    rank_pattern: dict[str, int] = setting({}, "per-layer initial rank: {name regex: rank}, matched like PEFT's")
    alpha_pattern: dict[str, float] = setting({}, "per-layer alpha: {name regex: alpha}")
    reallocate: bool = setting(True, "move rank between layers during training (off: a static allocation)")
    importance: str = setting(
        "sensitivity",
        "layer importance: sensitivity (AdaLoRA's |w * grad| with uncertainty) | gradient (gradient "
        "norm, the paper's rule) | update_norm (size of each component's update)",
        choices=IMPORTANCES,
        engine=True,
    )
    budget: int | None = setting(
        None,
        "adapter parameters the allocation may use (default: what rank on every layer uses, i.e. static LoRA's); "
        "layers that start above it are pruned to it on a cubic schedule that meets it at the last re-allocation",
        engine=True,
    )
    start_ratio: float = setting(
        1.5,
        "over-parameterised start: every layer begins at round(start_ratio x its rank) components (at most its "
        "capacity, max_rank) and re-allocations prune them to the budget, as AdaLoRA's init_r 12 -> target_r 8; the "
        "scale stays alpha / rank, and the trainable parameters reported are the final ones (the peak too); 1: "
        "start at the budget",
        engine=True,
    )
    min_rank: int = setting(
        1, "smallest rank a layer is shrunk to (0 lets a layer drop out; it can grow back)", engine=True
    )
    temperature: float = setting(1.0, "allocation sharpness: a layer's share of the budget ~ score^(1/T)", engine=True)
    share: str = setting(
        "rank",
        "what a layer's score buys: rank (ranks ~ score: equal importance per rank across layers) | parameter "
        "(ranks ~ score / (in + out): equal importance per adapter parameter, the optimum under a parameter budget)",
        choices=SHARES,
        engine=True,
    )
    max_rank_change: int | None = setting(
        None, "most a layer's rank moves at one re-allocation (default: straight to its share)", engine=True
    )
    warmup: float | int = setting(
        0.1,
        "first re-allocation: a fraction of the run (float <= 1) or a step count (int)",
        flag="--schedule-warmup",
        engine=True,
        schedule=True,
    )
    interval: float | int = setting(
        0.05,
        "steps between re-allocations: a fraction of the run or a step count",
        flag="--schedule-interval",
        engine=True,
        schedule=True,
    )
    final: float | int = setting(
        0.8,
        "last re-allocation, after which ranks are frozen: a fraction of the run or a step count",
        flag="--schedule-final",
        engine=True,
        schedule=True,
    )
    beta1: float = setting(0.85, "EMA factor of the importance score", engine=True)
    beta2: float = setting(0.85, "EMA factor of the importance score's uncertainty", engine=True)
    seed: int = setting(
        0, "seed of the random rows of components added when a layer grows", flag="--adapter-seed", engine=True
    )
    input_adaptive: str | None = setting(
        None,
        "input adaptation: none (the default: it cost held-out loss on the decoder, docs/method.md) | mergeable "
        "(input normalisation by running statistics, folded into the weights at merge) | per_example (a per-token "
        "gate; cannot be merged or exported)",
        choices=INPUT_ADAPTATIONS,
    )
    input_norm_strength: float = setting(
        1.0,
        "how far mergeable input normalisation evens out feature sizes: scale (rms_ref / rms)^s, s in (0, 1]",
        engine=True,
    )
    input_norm_every: int = setting(
        10,
        "steps between folds of the mergeable input adaptation's statistics into its running average; every "
        "step's tokens count either way, the scale changes at folds only (1: every step)",
        engine=True,
    )
    init: str = setting(
        "lora",
        "where components start: lora (A random, as LoRA) | gradient (A along the top directions of the layer's "
        "loss gradient dL/dW, measured on the first step and on re-allocation steps; B = 0) | lora-ga (both factors "
        "from the first step's dL/dW as LoRA-GA sets them, the base weight offset so the output starts unchanged; "
        "components grown later start as with gradient)",
        choices=INITS,
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        _check(
            self.max_rank is None or self.max_rank >= self.rank,
            f"max_rank ({self.max_rank}) must be >= rank ({self.rank})",
        )
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(
            self.importance in IMPORTANCES,
            f"unknown importance scorer {self.importance!r}; choose one of: {', '.join(IMPORTANCES)}",
        )
        _check(
            self.input_adaptive is None or self.input_adaptive in INPUT_ADAPTATIONS,
            f"input_adaptive must be 'mergeable', 'per_example' or None, got {self.input_adaptive!r}",
        )
        _check(
            _number(self.input_norm_strength) and 0.0 < self.input_norm_strength <= 1.0,
            f"input_norm_strength must be in (0, 1], got {self.input_norm_strength!r}",
        )
        _check(
            _whole(self.input_norm_every) and self.input_norm_every >= 1,
            f"input_norm_every must be a whole number of steps >= 1, got {self.input_norm_every!r}",
        )
        changed = [name for name, default in NORM_DEFAULTS.items() if getattr(self, name) != default]
        _check(
            self.input_adaptive == "mergeable" or not changed,
            f"{' and '.join(changed)} only tune{'s' if len(changed) == 1 else ''} the mergeable input adaptation, "
            "which is off: add input_adaptive='mergeable' (--input-adaptive mergeable), or leave it out",
        )
        _check(self.share in SHARES, f"share must be one of {', '.join(map(repr, SHARES))}, got {self.share!r}")
        _check(self.init in INITS, f"init must be one of {', '.join(map(repr, INITS))}, got {self.init!r}")
        _check(
            not (self.init == "lora-ga" and self.input_adaptive == "per_example"),
            "init='lora-ga' offsets the base weight by the start's update, which a per-token gate would change from "
            "token to token; use input_adaptive 'mergeable' or none with it",
        )
        _check(0 <= self.min_rank <= self.rank, f"min_rank must be in [0, rank={self.rank}], got {self.min_rank}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        _check(
            self.max_rank_change is None or (_whole(self.max_rank_change) and self.max_rank_change >= 1),
            f"max_rank_change must be a whole number >= 1 (or None), got {self.max_rank_change!r}",
        )
        _check(self.budget is None or self.budget >= 0, f"budget must be >= 0 parameters, got {self.budget}")
        _check(
            _number(self.start_ratio) and self.start_ratio >= 1.0,
            f"start_ratio must be a number >= 1 (1: start at the budget), got {self.start_ratio!r}",
        )
        for name in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("warmup", "interval", "final"):
            value = getattr(self, name)
            _check(
                _number(value) and value >= 0,
                f"{name} must be a step count (int) or a fraction of training (float in [0, 1])",
            )
            _check(
                not (isinstance(value, float) and value > 1),
                f"{name}={value}: a float is a fraction of training (<= 1.0); an int is steps",
            )

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
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown DynamicLoRAConfig field(s): {', '.join(unknown)}")
        return cls(**data)


# What tunes the mergeable input adaptation, at its defaults: a config without that adaptation holds these.
NORM_DEFAULTS = {name: DynamicLoRAConfig.__dataclass_fields__[name].default for name in NORM_SETTINGS}


# Settings added after adapters and runs were saved, at what those did: a file without the key predates the setting
# (no run before it trained an untrained pooler or started above its budget).
PREDATING = {"train_untrained_pooler": False, "start_ratio": 1.0}


def written_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Adapter settings as an adapter, checkpoint or run directory wrote them, ready to load: a setting the file
    predates takes the value it ran with (``PREDATING``); settings of the mergeable input adaptation written while it
    was off had no effect (and were accepted before they were refused), so they load as their defaults."""
    data = {**PREDATING, **data}
    return data if data.get("input_adaptive") == "mergeable" else {**data, **NORM_DEFAULTS}


def tagged(settings: type, tag: str) -> tuple[str, ...]:
    """The names of the fields of the settings dataclass ``settings`` whose metadata carries ``tag`` (see
    :func:`setting`): the one way settings are grouped."""
    return tuple(f.name for f in dataclasses.fields(settings) if f.metadata.get(tag))


def engine_settings() -> tuple[str, ...]:
    """Settings that act only in Dynamic LoRA's engine (re-allocation, input normalisation): static LoRA ignores
    them."""
    return tagged(DynamicLoRAConfig, "engine")


def static_lora(config: DynamicLoRAConfig) -> DynamicLoRAConfig:
    """Plain LoRA on the same layers at the same rank: no re-allocation (so no start above it), no input adaptation,
    random A."""
    return dataclasses.replace(
        config, reallocate=False, max_rank=None, start_ratio=1.0, input_adaptive=None, init="lora", **NORM_DEFAULTS
    )


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value == value


def _whole(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)
