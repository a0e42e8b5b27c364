"""Inject DynamicLoRALinear layers into a Hugging Face model; merge, save, load and export the adapter."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .allocator import RankAllocator
from .config import DynamicLoRAConfig
from .gate import commit_statistics, discard_statistics
from .io import atomic_write, write_json
from .layer import DynamicLoRALinear, components, layer_dims
from .optim_state import clear_state
from .probe import GradientProbe, synced_gradients, top_directions
from .targets import default_modules_to_save, default_target_modules, find_targets, name_matches, pattern_matches

CONFIG_NAME = "dynlora_config.json"
WEIGHTS_NAME = "dynlora_model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerSpec:
    """How one layer is built: initial rank (fixes its scale), alpha, capacity."""

    rank: int
    alpha: float
    max_rank: int


def _first_match(patterns: dict[str, Any], name: str, default: Any) -> Any:
    return next((v for k, v in patterns.items() if pattern_matches(k, name)), default)


def _resolve_specs(model: nn.Module, config: DynamicLoRAConfig, exclude: list[str]) -> dict[str, LayerSpec]:
    targets = config.target_modules if config.target_modules is not None else default_target_modules(model)
    specs = {}
    for name in find_targets(model, targets, exclude):
        rank = int(_first_match(config.rank_pattern, name, config.rank))
        alpha = float(_first_match(config.alpha_pattern, name, config.alpha))
        in_f, out_f = layer_dims(model.get_submodule(name))
        limit = min(in_f, out_f)
        asked = max(rank, config.max_rank or 0)  # what the user set explicitly must fit
        if asked > limit:
            raise ValueError(
                f"rank {asked} is larger than layer {name} allows ({in_f} -> {out_f}: at most {limit}); "
                "lower rank/max_rank or use rank_pattern for this layer"
            )
        # The implicit capacity (2 x rank when re-allocating) is capped at what the layer can hold.
        max_rank = asked if config.max_rank is not None else min(max(rank, config.capacity), limit)
        specs[name] = LayerSpec(rank, alpha, max_rank)
    return specs


def _resolve_saved_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Top-level module names matching ``names``; each entry must match something."""
    found: list[str] = []
    for entry in names:
        hits = [n for n, _ in model.named_modules() if n and name_matches([entry], n)]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}")
        found += [h for h in hits if not any(h.startswith(f + ".") for f in found) and h not in found]
    return found


class DynamicLoRAModel(nn.Module):
    """A Hugging Face model with Dynamic LoRA adapters. Anything it does not define is forwarded to the model,
    so ``forward``, ``generate``, ``config`` and the ``labels -> loss`` API work as before.

    Build it with :func:`get_dynlora_model` or :meth:`from_pretrained`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DynamicLoRAConfig,
        *,
        _specs: dict[str, LayerSpec] | None = None,
        _saved_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        if any(isinstance(m, DynamicLoRALinear) for m in model.modules()):
            raise ValueError("this model already has Dynamic LoRA layers; pass the plain base model")
        self.model = model
        self.dynlora_config = config
        # Carry the base model's forward signature: tools read it (Trainer drops dataset columns it does not name).
        self.forward = functools.update_wrapper(functools.partial(DynamicLoRAModel.forward, self), model.forward)
        if _saved_modules is None:
            wanted = default_modules_to_save(model) if config.modules_to_save is None else config.modules_to_save
            _saved_modules = _resolve_saved_modules(model, wanted)
        self.saved_module_names = list(_saved_modules)
        specs = _specs if _specs is not None else _resolve_specs(model, config, self.saved_module_names)

        model.requires_grad_(False)
        for name, spec in specs.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            layer = DynamicLoRALinear(getattr(parent, child), spec.rank, spec.alpha, spec.max_rank, config.dropout,
                                      config.input_adaptive, config.input_norm_strength)  # fmt: skip
            setattr(parent, child, layer)
        for name in self.saved_module_names:
            model.get_submodule(name).requires_grad_(True)
        self.unloaded = False
        # A plain attribute, not a submodule: it holds references to the layers, not parameters of its own.
        self.allocator = RankAllocator(self.lora_layers(), config) if config.reallocate else None
        self._input_norms = [m.input_norm for m in self.lora_layers().values() if m.input_norm is not None]
        # Layers whose ∂L/∂W is measured on the steps that need it (init="gradient"); kept, not searched per step.
        self._probes: dict[str, GradientProbe] = {}
        if config.init == "gradient":
            for name, layer in self.lora_layers().items():
                probe = GradientProbe(layer.in_features, layer.out_features, layer.lora_A.device)
                layer.probe = self._probes[name] = probe
        self.optimizer: torch.optim.Optimizer | None = None
        # True once the adapter holds trained weights (loaded): its components must not be re-initialised.
        self.pretrained = False

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        # `labels` is named so that Trainer, which reads the class's signature to find label columns, finds it.
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(*args, **kwargs)

    # --- inspection --------------------------------------------------------------------------------------------

    def lora_layers(self) -> dict[str, DynamicLoRALinear]:
        """Adapted layers by module name (names as in the base model, e.g. ``bert.encoder.layer.0...query``)."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, DynamicLoRALinear)}

    def rank_pattern(self) -> dict[str, int]:
        """Module name -> active rank."""
        return {n: m.rank for n, m in self.lora_layers().items()}

    def set_ranks(self, ranks: dict[str, int], generator: torch.Generator | None = None) -> None:
        """Set the active rank of the named layers (see :meth:`DynamicLoRALinear.set_rank`)."""
        layers = self.lora_layers()
        unknown = sorted(set(ranks) - set(layers))
        if unknown:
            raise KeyError(f"not an adapted layer: {', '.join(unknown[:5])}")
        for name, rank in ranks.items():
            layers[name].set_rank(rank, generator)

    def trainable_parameters(self) -> int:
        """Parameters that train: adapter parameters at the *active* ranks plus the modules to save."""
        adapters = sum(m.active_parameters() for m in self.lora_layers().values())
        extra = sum(p.numel() for n in self.saved_module_names for p in self.model.get_submodule(n).parameters())
        return adapters + extra

    # --- the Dynamic LoRA engine ------------------------------------------------------------------------------

    def bind_optimizer(self, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        """Bind, once, the optimizer whose state follows rank changes, and the run's length in optimizer steps
        (fractions in the schedule are resolved against it)."""
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap accelerate's AcceleratedOptimizer
        if self.allocator is not None:
            self.allocator.bind(optimizer, total_steps)
        self._arm_probes(1)

    def update_and_allocate(self, step: int) -> bool:
        """Call after each ``optimizer.step()``, before ``zero_grad()``, with the number of optimizer steps done
        (1, 2, ...): commits the mergeable input gate's statistics, updates the importance scores and re-allocates
        ranks when the schedule says so. Returns whether ranks were re-allocated.

        With ``init="gradient"`` the first step's loss gradient of each layer's weight sets where its components
        start (the adapters' own update of that step is replaced), and a re-allocation step's sets where grown
        components start."""
        commit_statistics(self._input_norms)
        grads = self._take_gradients()
        if grads and step == 1 and not self.pretrained:
            self._start_along(grads)
        reallocated = False if self.allocator is None else self.allocator.step(step, grads)
        self._arm_probes(step + 1)
        return reallocated

    def skip_step(self) -> None:
        """Call instead of :meth:`update_and_allocate` for a step whose update was skipped (e.g. a non-finite
        loss): its input statistics and measured gradients are dropped and no score or allocation sees it."""
        discard_statistics(self._input_norms)
        for probe in self._probes.values():
            if probe.armed:
                probe.arm()  # the step is tried again with the next batch: measure it afresh

    def _arm_probes(self, step: int) -> None:
        """Measure ∂L/∂W on ``step`` if it needs it: the first, or a re-allocation (grown components)."""
        schedule = self.allocator.schedule if self.allocator is not None else None
        wanted = step == 1 or (schedule is not None and schedule.is_reallocation(step))
        for probe in self._probes.values():
            if wanted:
                probe.arm()
            else:
                probe.disarm()

    def _take_gradients(self) -> dict[str, torch.Tensor]:
        """The measured ∂L/∂W of each layer on this step (synced over processes), and disarm; {} if none."""
        named = {n: p for n, p in self._probes.items() if p.armed}
        if not named:
            return {}
        grads = synced_gradients(list(named.values()))
        for probe in named.values():
            probe.disarm()
        return {n: g for n, g in zip(named, grads, strict=True) if g is not None}

    @torch.no_grad()
    def _start_along(self, grads: dict[str, torch.Tensor]) -> None:
        """Point every layer's active components along its gradient's top directions, B = 0, optimizer state
        cleared (the step that measured it moved only B, from a random A)."""
        for name, layer in self.lora_layers().items():
            if name in grads and layer.rank > 0:
                layer.point_components(0, top_directions(grads[name], layer.rank))
                clear_state(self.optimizer, layer, 0, layer.rank)

    def importance(self) -> dict[str, float]:
        """Module name -> current importance score of this process (empty for a static LoRA). Local: safe to call
        from one process only, e.g. for logging."""
        return {} if self.allocator is None else self.allocator.scorer.layer_scores()

    # --- merge -------------------------------------------------------------------------------------------------

    def merge_adapter(self) -> None:
        """Fold every adapter into its base weight (reversible with :meth:`unmerge_adapter`)."""
        for layer in self.lora_layers().values():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.lora_layers().values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the adapters and return the plain Hugging Face model, with no Dynamic LoRA module left in it."""
        self._check_not_unloaded()
        for name, layer in self.lora_layers().items():
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, layer.base_layer)
        self.unloaded = True
        return self.model

    def _check_not_unloaded(self) -> None:
        if self.unloaded:
            raise RuntimeError("merge_and_unload() was already called: this wrapper no longer has adapters")

    # --- save / load -------------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter at its active ranks (gate included) plus the modules to save, as contiguous CPU tensors."""
        state = {}
        for name, layer in self.lora_layers().items():
            if layer.merged:
                raise RuntimeError(f"layer {name} is merged: call unmerge_adapter() before saving")
            r = layer.rank
            for pname, param, axis, _ in layer.rank_parameters():
                state[f"{name}.{pname}"] = components(param.detach(), axis, 0, r).movedim(0, axis).cpu().contiguous()
            if layer.input_norm is not None:  # running statistics: the mergeable gate's whole state
                for key, value in layer.input_norm.state_dict().items():
                    state[f"{name}.input_norm.{key}"] = value.detach().cpu().clone()
            if layer.token_gate is not None:  # its weight is rank-indexed and saved above
                state[f"{name}.token_gate.bias"] = layer.token_gate.bias.detach().cpu().clone()
        for name in self.saved_module_names:
            for key, value in self.model.get_submodule(name).state_dict().items():
                state[f"{name}.{key}"] = value.detach().cpu().contiguous()
        return state

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``dynlora_model.safetensors`` (adapter + modules to save) and ``dynlora_config.json`` (config,
        each layer's rank/alpha/capacity, base model identity). Each file is written atomically; the config is
        written last, so a directory with a config is complete."""
        self._check_not_unloaded()
        out = Path(save_directory)
        state = self.adapter_state_dict()
        atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        hf_config = getattr(self.model, "config", None)
        meta = {
            "format": "dynlora",
            "format_version": FORMAT_VERSION,
            "config": self.dynlora_config.to_dict(),
            "layers": {
                n: {"rank": m.rank, "initial_rank": m.initial_rank, "alpha": m.alpha, "max_rank": m.max_rank}
                for n, m in self.lora_layers().items()
            },
            "modules_to_save": self.saved_module_names,
            "base_model": {
                "class": type(self.model).__name__,
                "model_type": getattr(hf_config, "model_type", None),
                "name_or_path": getattr(hf_config, "_name_or_path", None),
            },
        }
        write_json(out / CONFIG_NAME, meta)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory: str | os.PathLike) -> DynamicLoRAModel:
        """Rebuild the adapter saved by :meth:`save_pretrained` on ``model`` (a fresh copy of the same base model).

        Every mismatch (another model family, a missing layer, a tensor of the wrong shape, missing or extra
        tensors) is an error, never a silently disabled adapter.
        """
        meta = read_adapter_meta(adapter_directory)
        where = Path(adapter_directory)
        expected_type = meta["base_model"].get("model_type")
        actual_type = getattr(getattr(model, "config", None), "model_type", None)
        if expected_type is not None and expected_type != actual_type:
            raise ValueError(
                f"adapter in {where} was trained on a {expected_type!r} model, not this {actual_type!r} one"
            )
        missing = [n for n in meta["layers"] if not _has_module(model, n)]
        if missing:
            raise ValueError(f"adapter in {where} adapts layers this model does not have: {', '.join(missing[:5])}")
        specs = {
            n: LayerSpec(int(v["initial_rank"]), float(v["alpha"]), int(v["max_rank"]))
            for n, v in meta["layers"].items()
        }
        config = DynamicLoRAConfig.from_dict(meta["config"])
        wrapped = cls(model, config, _specs=specs, _saved_modules=list(meta["modules_to_save"]))
        wrapped.set_ranks({n: int(v["rank"]) for n, v in meta["layers"].items()})
        wrapped.load_adapter_state_dict(_load_weights(where / WEIGHTS_NAME))
        wrapped.pretrained = True
        return wrapped

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors written by :meth:`adapter_state_dict` (active ranks must already be set)."""
        expected = self.adapter_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{key}: saved shape {tuple(value.shape)} != expected {tuple(expected[key].shape)}")
        with torch.no_grad():
            for name, layer in self.lora_layers().items():
                r = layer.rank
                for pname, param, axis, _ in layer.rank_parameters():
                    components(param, axis, 0, r).copy_(state[f"{name}.{pname}"].movedim(axis, 0))
                if layer.input_norm is not None:
                    layer.input_norm.load_state_dict(_sub(state, f"{name}.input_norm."))
                if layer.token_gate is not None:
                    layer.token_gate.bias.copy_(state[f"{name}.token_gate.bias"])
            for name in self.saved_module_names:
                self.model.get_submodule(name).load_state_dict(_sub(state, f"{name}."))

    def export_peft(self, save_directory: str | os.PathLike) -> None:
        """Write a standard PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads (see
        :func:`dynlora.export.export_peft`)."""
        from .export import export_peft  # peft is only needed for export

        self._check_not_unloaded()
        export_peft(self, save_directory)


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


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


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the adapter directory is incomplete")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"{path} is corrupt or truncated ({e})") from e


def get_dynlora_model(model: nn.Module, config: DynamicLoRAConfig | None = None) -> DynamicLoRAModel:
    """Inject Dynamic LoRA layers into ``model`` (in place), freeze its base weights, return the wrapper."""
    return DynamicLoRAModel(model, config or DynamicLoRAConfig())
