"""Export a Dynamic LoRA adapter as a standard PEFT LoRA adapter.

Layers have different active ranks, so the export uses PEFT's ``rank_pattern``. Each layer's scale
``alpha / r_init`` is folded into its B matrix and every layer gets ``alpha == r`` (PEFT scale 1): a loader that
honours ``alpha_pattern`` (PEFT) and one that only reads the global ``lora_alpha``/``r`` and takes each layer's
rank from its tensor shapes (vLLM-style) compute the same output. Layers at rank 0 are left out: PEFT has no
rank-0 LoRA, and leaving a layer out is exactly its function. A LoRA-GA start's offset of the base weight is part
of the change to the checkpoint's weight: its factors are appended (layer.py), r₀ more components.

Mixture-of-experts weights go to PEFT's ``target_parameters`` (its ``ParamWrapper``): one rank R for all experts of
a parameter, A ``[R·E, in]`` with expert e's rows at ``e·R + k``, B ``[out, R·E]`` with its columns at ``k·E + e``.
Each expert's update is written at its own rank and zero-padded to the largest expert rank of the model (zero
rows and columns add nothing), which is the config's global ``r``. Several parameters of one module are nested
wrappers in the module's parameter order, the last outermost, so the earlier ones' tensors sit under
``base_layer.``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from .experts import ExpertUpdate, split_target_name
from .io import atomic_write
from .shipped_models import portable_name

if TYPE_CHECKING:
    from .model import DynamicLoRAModel

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def export_peft(model: DynamicLoRAModel, save_directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained(base,
    dir)`` loads and that reproduces this model's outputs."""
    from peft import LoraConfig  # imported here: peft is needed only to export

    updates = model.lora_layers()
    layers = {n: m for n, m in updates.items() if exported_rank(m) > 0 and not isinstance(m, ExpertUpdate)}
    parameters = expert_groups(updates)
    if not layers and not parameters:
        raise ValueError("every adapted layer has rank 0: there is no adapter to export")
    state = {}
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"layer {name} is merged: call unmerge_adapter() before exporting")
        a, b = layer.peft_factors()  # folds the mergeable input scale into A; refuses a per-example gate
        # PEFT's lora_A/lora_B are nn.Linear weights, (r, in) and (out, r), for Conv1D targets too.
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().cpu().contiguous()
    expert_rank = max((u.rank for experts in parameters.values() for u in experts), default=0)
    for (module, key), experts in parameters.items():
        if any(u.merged for u in experts):
            raise RuntimeError(f"{module} is merged: call unmerge_adapter() before exporting")
        a, b = stacked_factors(experts, expert_rank)
        state[f"{PEFT_PREFIX}{module}.{key}lora_A.weight"] = a
        state[f"{PEFT_PREFIX}{module}.{key}lora_B.weight"] = b
    for name in model.saved_module_names:
        for key, value in model.model.get_submodule(name).state_dict().items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()

    # Escaped full names, longest first: PEFT matches pattern keys as regex suffixes, first match wins.
    keys = {name: re.escape(name) for name in sorted(layers, key=len, reverse=True)}
    ranks = {keys[n]: exported_rank(layers[n]) for n in keys}
    # Expert weights take the global r (their rank): PEFT 0.21 warns about pattern keys naming parameters, and a
    # loader that reads only the global r still reads them right.
    top_rank = expert_rank or max(ranks.values())
    hf_config = getattr(model.model, "config", None)
    peft_config = LoraConfig(
        r=top_rank,
        lora_alpha=top_rank,
        target_modules=target_names(model.model, set(layers)) if layers else [],
        target_parameters=[f"{module}.{u[0].parameter}" for (module, _), u in parameters.items()] or None,
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        lora_dropout=0.0,
        bias="none",
        # PEFT corrects this per layer (Conv1D needs True, nn.Linear False); set it for the common case.
        fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()),
        modules_to_save=list(model.saved_module_names) or None,
        base_model_name_or_path=portable_name(getattr(hf_config, "_name_or_path", None) or None, hub=True),
        task_type=TASK_TYPES.get(type(model.model).__name__.rsplit("For", 1)[-1]),
        inference_mode=True,
    )
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / PEFT_WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    # What PEFT's save_pretrained writes, with its sets as sorted lists: the same adapter gives the same bytes.
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_config.to_dict().items()}
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(out / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def exported_rank(layer: nn.Module) -> int:
    """Rank of a layer's PEFT factors: its active rank, plus a LoRA-GA start's offset (layer.py)."""
    offset = getattr(layer, "offset_A", None)
    return layer.rank + (0 if offset is None else offset.shape[0])


def expert_groups(updates: dict[str, nn.Module]) -> dict[tuple[str, str], list[ExpertUpdate]]:
    """(module, key prefix of its PEFT wrapper) -> the experts' updates of one parameter, for every parameter with an
    expert above rank 0. The prefix is ``base_layer.`` once per exported parameter of the module registered after
    this one (module doc)."""
    by_param: dict[tuple[str, str], list[ExpertUpdate]] = {}
    for name, u in updates.items():
        if isinstance(u, ExpertUpdate):
            by_param.setdefault(split_target_name(name)[:2], []).append(u)
    exported = {k: sorted(v, key=lambda u: u.expert) for k, v in by_param.items() if any(u.rank for u in v)}
    groups = {}
    for (module, parameter), experts in exported.items():
        later = [p for m, p in exported if m == module]
        depth = len(later) - 1 - later.index(parameter)
        groups[(module, "base_layer." * depth)] = experts
    return groups


@torch.no_grad()
def stacked_factors(experts: list[ExpertUpdate], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``(lora_A, lora_B)`` of one parameter's experts at ``rank`` (module doc), each expert's scale folded
    into B."""
    count = len(experts)
    first = experts[0]
    a = torch.zeros(rank * count, first.in_features)
    b = torch.zeros(first.out_features, rank * count)
    for e, u in enumerate(experts):
        ua, ub = u.mergeable_factors()
        a[e * rank : e * rank + u.rank] = ua.float().cpu()
        b[:, torch.arange(u.rank) * count + e] = (ub * u.scaling).float().cpu()
    return a.contiguous(), b.contiguous()


# PEFT's task type per transformers head ("...ForCausalLM" -> CAUSAL_LM): what its AutoPeftModel classes read.
TASK_TYPES = {
    "CausalLM": "CAUSAL_LM",
    "SequenceClassification": "SEQ_CLS",
    "TokenClassification": "TOKEN_CLS",
    "QuestionAnswering": "QUESTION_ANS",
}


def target_names(model: nn.Module, adapted: set[str]) -> list[str]:
    """The adapted layers as PEFT's ``target_modules``: their last names (``q_proj``, ...) when those select exactly
    these layers, as PEFT's own configs name them; else their full names. Sorted."""
    short = {name.rsplit(".", 1)[-1] for name in adapted}
    selected = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in short}
    return sorted(short if selected == adapted else adapted)
