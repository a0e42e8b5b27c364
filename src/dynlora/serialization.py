"""The saved adapter: ``dynlora_model.safetensors`` (tensors at the active ranks) + ``dynlora_config.json``.

The config records the DynamicLoRAConfig, each layer's rank / initial rank / alpha / capacity (and for an expert's
update, the fused parameter it belongs to: format version 2), the modules saved whole, and the base model's
identity. A LoRA-GA start's base weight offsets are saved with the factors (format version 3). Each file is written
atomically and the config last, so a directory with a config is complete. Reading checks everything and says what
is wrong in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import DynamicLoRAConfig
from .experts import ExpertUpdate, split_target_name
from .input_adaptation import InputNorm
from .io import atomic_write, write_json
from .lowrank import LowRankUpdate, components
from .shipped_models import portable_name
from .targets import LayerSpec, has_module

CONFIG_NAME = "dynlora_config.json"
WEIGHTS_NAME = "dynlora_model.safetensors"
FORMAT_VERSION = 3
OFFSET_KEYS = ("offset_A", "offset_B")


def adapter_tensors(layers: dict[str, LowRankUpdate], model: nn.Module, saved: list[str]) -> dict:
    """The adapter at its active ranks (input adaptation included) plus the modules saved whole, as contiguous
    CPU tensors."""
    state = {}
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"layer {name} is merged: call unmerge_adapter() before saving")
        r = layer.rank
        for pname, param, axis, _ in layer.rank_parameters():
            state[f"{name}.{pname}"] = components(param.detach(), axis, 0, r).movedim(0, axis).cpu().contiguous()
        if layer.input_norm is not None:  # running statistics: the mergeable input adaptation's whole state
            for key, value in layer.input_norm.state_dict().items():
                state[f"{name}.input_norm.{key}"] = value.detach().cpu().clone()
        if layer.token_gate is not None:  # its weight is rank-indexed and saved above
            state[f"{name}.token_gate.bias"] = layer.token_gate.bias.detach().cpu().clone()
        for key in OFFSET_KEYS:  # a LoRA-GA start's offset of the base weight (layer.py)
            if getattr(layer, key, None) is not None:
                state[f"{name}.{key}"] = getattr(layer, key).detach().cpu().contiguous()
    for name in saved:
        for key, value in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = value.detach().cpu().contiguous()
    return state


@torch.no_grad()
def load_adapter_tensors(layers: dict[str, LowRankUpdate], model: nn.Module, saved: list[str], state: dict) -> None:
    """Load tensors written by :func:`adapter_tensors` (the active ranks must already be set)."""
    expected = adapter_tensors(layers, model, saved)
    missing = sorted(k for k in set(expected) - set(state) if not InputNorm.is_unfolded(k))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{key}: saved shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}")
    for name, layer in layers.items():
        for pname, param, axis, _ in layer.rank_parameters():
            components(param, axis, 0, layer.rank).copy_(state[f"{name}.{pname}"].movedim(axis, 0))
        if layer.input_norm is not None:
            layer.input_norm.load_state_dict(_sub(state, f"{name}.input_norm."))
        if layer.token_gate is not None:
            layer.token_gate.bias.copy_(state[f"{name}.token_gate.bias"])
        if getattr(layer, "offset_A", None) is not None:
            layer.set_offset(*(state[f"{name}.{key}"] for key in OFFSET_KEYS))
    for name in saved:
        model.get_submodule(name).load_state_dict(_sub(state, f"{name}."))


def write_adapter(
    directory: str | os.PathLike,
    config: DynamicLoRAConfig,
    layers: dict[str, LowRankUpdate],
    model: nn.Module,
    saved: list[str],
) -> None:
    """Write the adapter's two files (module doc)."""
    out = Path(directory)
    state = adapter_tensors(layers, model, saved)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    hf_config = getattr(model, "config", None)
    meta = {
        "format": "dynlora",
        "format_version": format_version(layers),
        "config": config.to_dict(),
        "layers": {n: layer_meta(m) for n, m in layers.items()},
        "modules_to_save": list(saved),
        "base_model": {
            "class": type(model).__name__,
            "model_type": getattr(hf_config, "model_type", None),
            "name_or_path": portable_name(getattr(hf_config, "_name_or_path", None) or None),
            "quantized_bits": quantized_bits(hf_config),
        },
        "labels": class_names(model),
    }
    write_json(out / CONFIG_NAME, meta)


def format_version(layers: dict[str, LowRankUpdate]) -> int:
    """The oldest format that holds these layers, so older readers load what they can: 1; 2 adds updates of bare
    parameters (experts); 3 the base weight offsets of a LoRA-GA start."""
    if any(getattr(m, "offset_A", None) is not None for m in layers.values()):
        return 3
    return 2 if any(isinstance(m, ExpertUpdate) for m in layers.values()) else 1


def layer_meta(layer: LowRankUpdate) -> dict[str, Any]:
    """What rebuilds a layer: its ranks and alpha, and the parameter an expert's update belongs to."""
    meta = {"rank": layer.rank, "initial_rank": layer.initial_rank, "alpha": layer.alpha, "max_rank": layer.max_rank}
    return meta | ({"parameter": layer.parameter} if isinstance(layer, ExpertUpdate) else {})


def quantized_bits(hf_config: Any) -> int | None:
    """4 or 8 for a bitsandbytes-quantised base (QLoRA), else None: an adapter records the base it was trained
    on, so that it is scored and served on the same one."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    return 4 if q.get("load_in_4bit") else 8 if q.get("load_in_8bit") else None


def class_names(model: nn.Module) -> list[str] | None:
    """A classifier's class names in id order (its config's ``id2label``); None for other models."""
    config = getattr(model, "config", None)
    if not type(model).__name__.endswith("ForSequenceClassification") or config is None:
        return None
    return [str(config.id2label[i]) for i in range(config.num_labels)]


def apply_class_names(model: nn.Module, names: list[str] | None) -> None:
    """Give ``model``'s config the class names an adapter recorded (its head is the adapter's)."""
    config = getattr(model, "config", None)
    if names and config is not None and getattr(config, "num_labels", None) == len(names):
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


def read_adapter_meta(adapter_directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``dynlora_config.json``; a clear error for a directory that is not a saved adapter."""
    where = Path(adapter_directory)
    path = where / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{where} is not a Dynamic LoRA adapter directory: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the adapter directory is corrupt") from e
    if meta.get("format") != "dynlora" or not {"config", "layers", "modules_to_save", "base_model"} <= set(meta):
        raise ValueError(f"{path} is not a Dynamic LoRA adapter config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['format_version']}; upgrade dynlora to read it")
    return meta


def saved_specs(model: nn.Module, meta: dict[str, Any], where: Path) -> dict[str, LayerSpec]:
    """Each saved layer's spec (initial rank, alpha, capacity, adapted parameter), after checking that ``model`` is
    of the family the adapter was trained on and has every layer it adapts: a mismatch is an error, never a silently
    disabled adapter."""
    expected_type = meta["base_model"].get("model_type")
    actual_type = getattr(getattr(model, "config", None), "model_type", None)
    if expected_type is not None and expected_type != actual_type:
        raise ValueError(f"adapter in {where} was trained on a {expected_type!r} model, not this {actual_type!r} one")
    modules = {n: split_target_name(n)[0] if v.get("parameter") else n for n, v in meta["layers"].items()}
    missing = [n for n, module in modules.items() if not has_module(model, module)]
    if missing:
        raise ValueError(f"adapter in {where} adapts layers this model does not have: {', '.join(missing[:5])}")
    return {
        n: LayerSpec(int(v["initial_rank"]), float(v["alpha"]), int(v["max_rank"]), v.get("parameter"))
        for n, v in meta["layers"].items()
    }


def read_adapter_weights(adapter_directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(adapter_directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter directory is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is corrupt or truncated ({e})") from e


def saved_output_sizes(adapter_directory: str | os.PathLike) -> dict[str, int]:
    """Output width of each module saved whole (e.g. the task head's number of labels), read without loading."""
    meta = read_adapter_meta(adapter_directory)
    sizes = {}
    with safe_open(str(Path(adapter_directory) / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
        for name in meta["modules_to_save"]:
            if f"{name}.weight" in keys:
                sizes[name] = f.get_slice(f"{name}.weight").get_shape()[0]
    return sizes


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
