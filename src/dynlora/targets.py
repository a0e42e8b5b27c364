"""Which modules of a Hugging Face model get an adapter, at which rank: per-family defaults, PEFT-compatible name
and pattern matching, per-layer specs, and replacing a child module."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import DynamicLoRAConfig
from .layer import SUPPORTED_BASE_LAYERS, layer_dims

# The attention projections that LoRA papers adapt by default, per `config.model_type`.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
}

# Task heads that must stay trainable on classification-style models (PEFT's SEQ_CLS choice, plus QA/NER heads).
HEAD_MODULE_NAMES = ("classifier", "score", "qa_outputs")


def pattern_matches(pattern: str, name: str) -> bool:
    """PEFT's rule for rank/alpha patterns: ``pattern`` matches the end of the name at a dot boundary."""
    return re.fullmatch(rf"(.*\.)?(?:{pattern})", name) is not None


def name_matches(targets: list[str] | str, name: str) -> bool:
    """A list entry matches a name equal to it or ending in ``.entry``; a string is a full-name regex."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def default_target_modules(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    try:  # PEFT keeps a longer table; use it for families we do not list ourselves.
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    except ImportError:  # pragma: no cover - peft is a dependency, but the core must not need it
        peft_table = {}
    if model_type in peft_table:
        return list(peft_table[model_type])
    raise ValueError(
        f"no default target modules for model type {model_type!r}; pass target_modules explicitly. "
        f"Linear layers of this model: {candidate_summary(model)}"
    )


def default_modules_to_save(model: nn.Module, with_untrained_pooler: bool = True) -> list[str]:
    """The task head of a classification or QA model (text, image, audio: ``...ForXClassification``), with any
    pooler it reads through that was never trained (:func:`untrained_poolers`) unless ``with_untrained_pooler`` is
    off; nothing for base or generative models."""
    cls = type(model).__name__
    if not cls.endswith(("Classification", "ForQuestionAnswering")):
        return []
    children = dict(model.named_children())
    heads = [n for n in HEAD_MODULE_NAMES if n in children]
    return heads + (untrained_poolers(model) if with_untrained_pooler else [])


@torch.no_grad()
def untrained_poolers(model: nn.Module) -> list[str]:
    """Poolers (BERT's ``pooler``: a dense layer and tanh over the first token) whose bias is all zeros: their
    initial value, so the checkpoint never trained them. A sentence-transformers checkpoint such as MiniLM-L6 was
    trained through mean pooling and ships such a pooler; a classifier reading through it frozen sees almost the
    same vector for every input, so it is trained with the head."""
    return [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] == "pooler"
        and isinstance(getattr(module, "dense", None), nn.Linear)
        and module.dense.bias is not None
        and not module.dense.bias.any()
    ]


def linear_module_names(model: nn.Module) -> Iterable[str]:
    return (n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS))


def candidate_summary(model: nn.Module, limit: int = 20) -> str:
    """Distinct last name parts of the adaptable layers, e.g. ``query, key, value, dense``."""
    seen: dict[str, None] = {}
    for name in linear_module_names(model):
        seen.setdefault(name.rsplit(".", 1)[-1], None)
    names = list(seen)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none: the model has no nn.Linear/Conv1D layers)"


ALL_LINEAR = "all-linear"


def all_linear(model: nn.Module) -> list[str]:
    """PEFT's ``"all-linear"``: every nn.Linear / Conv1D but the output layer (a language model's head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS) and m is not output]


def find_targets(model: nn.Module, targets: list[str] | str, exclude: list[str]) -> list[str]:
    """Names of the modules to adapt, in model order; a clear ValueError when nothing (adaptable) matches.
    ``exclude``: full names of modules (and everything inside them) never to adapt, such as a saved task head."""
    given_all_linear = targets == ALL_LINEAR
    if given_all_linear:
        targets = all_linear(model)
    found, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or not name_matches(targets, name):
            continue
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if isinstance(module, SUPPORTED_BASE_LAYERS):
            found.append(name)
        elif not any(name.startswith(f + ".") for f in found):
            wrong_type.append(f"{name} ({type(module).__name__})")
    if wrong_type and not found:
        raise ValueError(
            f"target_modules {targets!r} matched only layers that cannot be adapted: {', '.join(wrong_type[:5])}. "
            f"Only nn.Linear and Conv1D are supported; candidates: {candidate_summary(model)}"
        )
    if not found:
        raise ValueError(
            f"target_modules {targets!r} matched no module of this {type(model).__name__}. "
            f"Candidates: {candidate_summary(model)}"
        )
    if isinstance(targets, list) and not given_all_linear:
        unmatched = [t for t in targets if not any(name_matches([t], n) for n in found)]
        if unmatched:  # a recipe written for another family adapts less than it says: never silently
            warnings.warn(
                f"target_modules {', '.join(map(repr, unmatched))} match no adaptable layer of this "
                f"{type(model).__name__} and are left out (candidates: {candidate_summary(model)})",
                stacklevel=3,
            )
    fused = [n for n, p in model.named_parameters() if p.dim() == 3 and "expert" in n]
    if fused:
        warnings.warn(
            f"{len(fused)} fused 3-D weights ({fused[0]}, ...: mixture-of-experts experts) are not adapted and stay "
            "frozen: dynlora adapts nn.Linear and Conv1D layers only",
            stacklevel=3,
        )
    return found


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is built: initial rank (fixes its scale), alpha, capacity."""

    rank: int
    alpha: float
    max_rank: int


def _first_match(patterns: dict[str, Any], name: str, default: Any) -> Any:
    return next((v for k, v in patterns.items() if pattern_matches(k, name)), default)


def resolve_specs(model: nn.Module, config: DynamicLoRAConfig, exclude: list[str]) -> dict[str, LayerSpec]:
    """Every layer to adapt with its rank, alpha and capacity (``rank_pattern``/``alpha_pattern`` applied)."""
    targets = config.target_modules if config.target_modules is not None else default_target_modules(model)
    specs, capped = {}, []
    for name in find_targets(model, targets, exclude):
        rank = int(_first_match(config.rank_pattern, name, config.rank))
        alpha = float(_first_match(config.alpha_pattern, name, config.alpha))
        in_f, out_f = layer_dims(model.get_submodule(name))
        limit = min(in_f, out_f)
        explicit = any(pattern_matches(k, name) for k in config.rank_pattern) or config.max_rank is not None
        if targets == ALL_LINEAR and rank > limit and not explicit:
            # all-linear names every layer, a router's 1-wide gate too: it gets what it can hold, as in PEFT
            rank = limit
            capped.append(f"{name} ({in_f} -> {out_f})")
        asked = max(rank, config.max_rank or 0)  # what the user set explicitly must fit
        if asked > limit:
            raise ValueError(
                f"rank {asked} is larger than layer {name} allows ({in_f} -> {out_f}: at most {limit}); "
                "lower rank/max_rank or use rank_pattern for this layer"
            )
        # The implicit capacity (2 x rank when re-allocating) is capped at what the layer can hold.
        max_rank = asked if config.max_rank is not None else min(max(rank, config.capacity), limit)
        specs[name] = LayerSpec(rank, alpha, max_rank)
    if capped:
        warnings.warn(
            f"all-linear: {len(capped)} layer(s) narrower than rank {config.rank} are adapted at their width: "
            f"{', '.join(capped[:3])}{', ...' if len(capped) > 3 else ''}",
            stacklevel=3,
        )
    return specs


def resolve_saved_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Top-level module names matching ``names``; each entry must match something."""
    found: list[str] = []
    for entry in names:
        hits = [n for n, _ in model.named_modules() if n and name_matches([entry], n)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}")
        found += [h for h in hits if not any(h.startswith(f + ".") for f in found) and h not in found]
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
