"""Export a Dynamic LoRA adapter as a standard PEFT LoRA adapter.

Layers have different active ranks, so the export uses PEFT's ``rank_pattern``. Each layer's scale
``alpha / r_init`` is folded into its B matrix and every layer gets ``alpha == r`` (PEFT scale 1): a loader that
honours ``alpha_pattern`` (PEFT) and one that only reads the global ``lora_alpha``/``r`` and takes each layer's
rank from its tensor shapes (vLLM-style) compute the same output. Layers at rank 0 are left out: PEFT has no
rank-0 LoRA, and leaving a layer out is exactly its function.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file
from torch import nn

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

    layers = {n: m for n, m in model.lora_layers().items() if m.rank > 0}
    if not layers:
        raise ValueError("every adapted layer has rank 0: there is no adapter to export")
    state = {}
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"layer {name} is merged: call unmerge_adapter() before exporting")
        a, b = layer.mergeable_factors()  # folds a mergeable input gate into A; refuses a per-example one
        # PEFT's lora_A/lora_B are nn.Linear weights, (r, in) and (out, r), for Conv1D targets too.
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().cpu().contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (b.detach() * layer.scaling).cpu().contiguous()
    for name in model.saved_module_names:
        for key, value in model.model.get_submodule(name).state_dict().items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()

    # Escaped full names, longest first: PEFT matches pattern keys as regex suffixes, first match wins.
    keys = {name: re.escape(name) for name in sorted(layers, key=len, reverse=True)}
    ranks = {keys[n]: layers[n].rank for n in keys}
    top_rank = max(ranks.values())
    hf_config = getattr(model.model, "config", None)
    peft_config = LoraConfig(
        r=top_rank,
        lora_alpha=top_rank,
        target_modules=target_names(model.model, set(layers)),
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
