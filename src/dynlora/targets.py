"""Which modules of a Hugging Face model get an adapter, at which rank: per-family defaults, PEFT-compatible name
and pattern matching, per-layer specs, and replacing a child module.

Two kinds of target: linear layers (``nn.Linear``, GPT-2's ``Conv1D``), named by their module, and bare weight
parameters of mixture-of-experts blocks (experts.py), named ``<module>.<parameter>``: the fused experts (every 3-D
parameter, ``gate_up_proj``, ``down_proj``) and the routers (the 2-D ``weight`` of a module beside the experts,
with one row per expert; ``gate`` or ``gate.weight`` names it). A target entry matches either kind."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ALL_LINEAR, DynamicLoRAConfig
from .experts import parameter_dims, target_name
from .layer import SUPPORTED_BASE_LAYERS, layer_dims
from .moe_targets import expert_parameters, parameter_targets

# The fused expert weights of transformers' mixture-of-experts blocks (all of them: the module is named).
MOE_EXPERTS = ("experts",)

# The attention projections that LoRA papers adapt by default, per `config.model_type`; in a mixture of experts
# the experts too, whose allocation is where Dynamic LoRA differs most from LoRA.
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
    "mixtral": ["q_proj", "v_proj", *MOE_EXPERTS],
    "qwen2_moe": ["q_proj", "v_proj", *MOE_EXPERTS],
    "qwen3_moe": ["q_proj", "v_proj", *MOE_EXPERTS],
    "olmoe": ["q_proj", "v_proj", *MOE_EXPERTS],
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
    """Distinct last name parts of the adaptable layers and parameters, e.g. ``query, key, value, dense``."""
    seen: dict[str, None] = {}
    for name in linear_module_names(model):
        seen.setdefault(name.rsplit(".", 1)[-1], None)
    for name in parameter_targets(model):
        module, _, pname = name.rpartition(".")
        seen.setdefault(module.rsplit(".", 1)[-1] if pname == "weight" else pname, None)
    names = list(seen)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "(none: the model has no nn.Linear/Conv1D layers)"


def all_linear(model: nn.Module) -> list[str]:
    """PEFT's ``"all-linear"``: every nn.Linear / Conv1D but the output layer (a language model's head)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS) and m is not output]


def _parameter_matches(targets: list[str] | str, name: str) -> bool:
    """A parameter target ``<module>.<parameter>`` matches by its own name or by its module's: ``gate_up_proj``,
    ``experts`` (all of a block's experts), ``gate`` or ``gate.weight`` (a router)."""
    return name_matches(targets, name) or name_matches(targets, name.rpartition(".")[0])


def find_targets(model: nn.Module, targets: list[str] | str, exclude: list[str]) -> tuple[list[str], list[str]]:
    """Names of the linear layers and of the bare parameters (``<module>.<parameter>``) to adapt, in model order;
    a clear ValueError when nothing adaptable matches, one warning naming every list entry that matches nothing.
    ``exclude``: full names of modules (and everything inside them) never to adapt, such as a saved task head."""

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in exclude)

    given_all_linear = targets == ALL_LINEAR
    candidates = parameter_targets(model)
    if given_all_linear:
        targets = all_linear(model) + candidates
    found, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or not name_matches(targets, name) or excluded(name):
            continue
        if isinstance(module, SUPPORTED_BASE_LAYERS):
            found.append(name)
        elif not any(name.startswith(f + ".") for f in found) and not any(c.startswith(name + ".") for c in candidates):
            wrong_type.append(f"{name} ({type(module).__name__})")
    params = [c for c in candidates if _parameter_matches(targets, c) and not excluded(c)]
    if wrong_type and not found and not params:
        raise ValueError(
            f"target_modules {targets!r} matched only layers that cannot be adapted: {', '.join(wrong_type[:5])}. "
            f"Only nn.Linear, Conv1D and mixture-of-experts weights are supported; candidates: "
            f"{candidate_summary(model)}"
        )
    if not found and not params:
        raise ValueError(
            f"target_modules {targets!r} matched no module of this {type(model).__name__}. "
            f"Candidates: {candidate_summary(model)}"
        )
    if isinstance(targets, list) and not given_all_linear:
        unmatched = [
            t
            for t in targets
            if not any(name_matches([t], n) for n in found) and not any(_parameter_matches([t], p) for p in params)
        ]
        if unmatched:  # a recipe written for another family adapts less than it says: never silently
            warnings.warn(
                f"target_modules {', '.join(map(repr, unmatched))} match no adaptable layer of this "
                f"{type(model).__name__} and are left out (candidates: {candidate_summary(model)})",
                stacklevel=3,
            )
    frozen = [c for c in expert_parameters(model) if c not in params]
    if frozen:
        warnings.warn(
            f"{len(frozen)} mixture-of-experts weights ({frozen[0]}, ...) are not in target_modules and stay "
            f"frozen; add {', '.join(sorted({c.rpartition('.')[2] for c in frozen}))} or use all-linear to adapt them",
            stacklevel=3,
        )
    return found, params


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is built: initial rank (fixes its scale), alpha, capacity."""

    rank: int
    alpha: float
    max_rank: int
    parameter: str | None = None  # an expert's update of this bare parameter (experts.py); None: a linear layer


def _first_match(patterns: dict[str, Any], name: str, default: Any) -> Any:
    return next((v for k, v in patterns.items() if pattern_matches(k, name)), default)


def resolve_specs(model: nn.Module, config: DynamicLoRAConfig, exclude: list[str]) -> dict[str, LayerSpec]:
    """Every layer to adapt with its rank, alpha and capacity (``rank_pattern``/``alpha_pattern`` applied); a bare
    parameter gives one layer per expert (:func:`~dynlora.experts.target_name`), all with its spec."""
    targets = config.target_modules if config.target_modules is not None else default_target_modules(model)
    linear, params = find_targets(model, targets, exclude)
    specs, capped = {}, []
    for name in linear + params:
        rank = int(_first_match(config.rank_pattern, name, config.rank))
        alpha = float(_first_match(config.alpha_pattern, name, config.alpha))
        if name in params:
            module, _, pname = name.rpartition(".")
            experts, in_f, out_f = parameter_dims(model.get_submodule(module), pname)
        else:
            experts, (in_f, out_f) = 0, layer_dims(model.get_submodule(name))
        limit = min(in_f, out_f)
        explicit = any(pattern_matches(k, name) for k in config.rank_pattern)
        wanted_max = config.max_rank
        if targets == ALL_LINEAR and max(rank, wanted_max or 0) > limit and not explicit:
            # all-linear names every layer, a router's 1-wide gate too: it gets what it can hold, as in PEFT
            rank, wanted_max = min(rank, limit), None if wanted_max is None else limit
            capped.append(f"{name} ({in_f} -> {out_f})")
        asked = max(rank, wanted_max or 0)  # what the user set explicitly must fit
        if asked > limit:
            raise ValueError(
                f"rank {asked} is larger than layer {name} allows ({in_f} -> {out_f}: at most {limit}); "
                "lower rank/max_rank or use rank_pattern for this layer"
            )
        # The implicit capacity (2 x rank when re-allocating) is capped at what the layer can hold.
        max_rank = asked if wanted_max is not None else min(max(rank, config.capacity), limit)
        if name in params:
            module, _, pname = name.rpartition(".")
            for e in range(experts):
                specs[target_name(module, pname, e)] = LayerSpec(rank, alpha, max_rank, pname)
        else:
            specs[name] = LayerSpec(rank, alpha, max_rank)
    if capped:
        warnings.warn(
            f"all-linear: {len(capped)} layer(s) narrower than rank {max(config.rank, config.max_rank or 0)} are "
            "adapted at their width: "
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
