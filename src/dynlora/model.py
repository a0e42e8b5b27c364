"""DynamicLoRAModel: a Hugging Face model with Dynamic LoRA layers injected; the engine driven from it; merge,
save, load and export.

Which layers, at which rank: targets.py. A linear layer's update: layer.py; a mixture of experts' (one update per
expert): experts.py. What happens after each optimizer step: engine.py. The files on disk: serialization.py. The
PEFT format: export.py.
"""

from __future__ import annotations

import collections
import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import DynamicLoRAConfig, written_settings
from .conveniences import EcosystemMethods
from .engine import Engine
from .experts import DynamicLoRAParameters, split_target_name
from .export import export_peft
from .input_adaptation import InputNorm
from .layer import DynamicLoRALinear
from .lowrank import LowRankUpdate
from .serialization import (
    adapter_tensors,
    apply_class_names,
    load_adapter_tensors,
    read_adapter_meta,
    read_adapter_weights,
    saved_specs,
    write_adapter,
)
from .targets import (
    LayerSpec,
    default_modules_to_save,
    replace_module,
    resolve_saved_modules,
    resolve_specs,
)


class DynamicLoRAModel(EcosystemMethods, nn.Module):
    """A Hugging Face model with Dynamic LoRA adapters. Anything it does not define is forwarded to the model,
    so ``forward``, ``generate``, ``config`` and the ``labels -> loss`` API work as before.

    Build it with :func:`get_dynlora_model` or :meth:`from_pretrained`.
    """

    # Adapters are attached: transformers.Trainer then accepts a quantised (QLoRA) base, as for a PEFT model.
    _hf_peft_config_loaded = True

    def __init__(
        self,
        model: nn.Module,
        config: DynamicLoRAConfig,
        *,
        _specs: dict[str, LayerSpec] | None = None,
        _saved_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        if any(isinstance(m, (LowRankUpdate, DynamicLoRAParameters)) for m in model.modules()):
            raise ValueError("this model already has Dynamic LoRA layers; pass the plain base model")
        self.model = model
        self.dynlora_config = config
        # Carry the base model's forward signature: tools read it (Trainer drops dataset columns it does not name).
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)
        if _saved_modules is None:
            default = default_modules_to_save(model, config.train_untrained_pooler)
            wanted = default if config.modules_to_save is None else config.modules_to_save
            _saved_modules = resolve_saved_modules(model, wanted)
        self.saved_module_names = list(_saved_modules)
        specs = _specs if _specs is not None else resolve_specs(model, config, self.saved_module_names)

        model.requires_grad_(False)
        experts: dict[str, dict[str, dict[int, tuple[int, float, int]]]] = {}
        for name, spec in specs.items():
            if spec.parameter is not None:  # one expert's update of a bare parameter: built per module below
                module, pname, e = split_target_name(name)
                experts.setdefault(module, {}).setdefault(pname, {})[e] = (spec.rank, spec.alpha, spec.max_rank)
                continue
            layer = DynamicLoRALinear(
                model.get_submodule(name),
                spec.rank,
                spec.alpha,
                spec.max_rank,
                config.dropout,
                config.input_adaptive,
                config.input_norm_strength,
                config.rslora,
            )
            replace_module(model, name, layer)
        for module, params in experts.items():
            ordered = {p: [by_expert[e] for e in sorted(by_expert)] for p, by_expert in params.items()}
            replace_module(model, module, DynamicLoRAParameters(model.get_submodule(module), ordered, config.rslora))
        for name in self.saved_module_names:
            model.get_submodule(name).requires_grad_(True)
        self.unloaded = False
        # Plain attributes, not submodules: they hold references to the layers, not parameters of their own.
        # _layers: every update the engine drives (a linear layer, an expert); _adapted: the modules put in place
        # of the base model's (a linear layer, an experts block or router), which merge and unload.
        self._layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankUpdate)}
        self._adapted = {
            n: m for n, m in model.named_modules() if isinstance(m, (DynamicLoRALinear, DynamicLoRAParameters))
        }
        self.engine = Engine(self._layers, config)

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

    def lora_layers(self) -> dict[str, LowRankUpdate]:
        """Adapted layers by module name (names as in the base model, e.g. ``bert.encoder.layer.0...query``; an
        expert's update of a fused weight as ``...mlp.experts.lora.gate_up_proj.3``)."""
        return dict(self._layers)

    def rank_pattern(self) -> dict[str, int]:
        """Module name -> active rank."""
        return {n: m.rank for n, m in self._layers.items()}

    def set_ranks(self, ranks: dict[str, int], generator: torch.Generator | None = None) -> None:
        """Set the active rank of the named layers (see :meth:`DynamicLoRALinear.set_rank`)."""
        unknown = sorted(set(ranks) - set(self._layers))
        if unknown:
            raise KeyError(f"not an adapted layer: {', '.join(unknown[:5])}")
        for name, rank in ranks.items():
            self.engine.set_rank(name, rank, generator)

    # --- the training state -------------------------------------------------------------------------------------

    def _training_state_names(self) -> set[str]:
        names = {
            f"model.{n}.{key}" for n, m in self._layers.items() for key in m.state_dict() if "base_layer" not in key
        }
        for name in self.saved_module_names:
            names |= {f"model.{name}.{key}" for key in self.model.get_submodule(name).state_dict()}
        return names

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The training state, not the frozen base model: every adapter tensor as stored (lowrank.py), the input
        adaptation's statistics and the modules saved whole. It is what a ``transformers.Trainer`` checkpoint holds
        of this model: megabytes instead of the base model's gigabytes, and no tied weights (which safetensors
        refuses). ``model.model.state_dict()`` is the whole base model; :meth:`adapter_state_dict` the adapter at
        its active ranks."""
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + name for name in self._training_state_names()}
        out = destination if destination is not None else collections.OrderedDict()
        out.update((k, v) for k, v in full.items() if k in keep)
        return out

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load what :meth:`state_dict` wrote (the base model's own weights are not expected); ``strict``: exactly
        those keys, except that input statistics not yet folded in may be absent (states written before
        dynlora kept them): they are then empty."""
        expected = self._training_state_names()
        missing = sorted(k for k in expected - set(state_dict) if not InputNorm.is_unfolded(k))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"training state does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        super().load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False, assign=assign)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    # --- the engine (engine.py) --------------------------------------------------------------------------------

    def bind_optimizer(self, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        """Bind, once, the optimizer whose state follows rank changes, and the run's length in optimizer steps
        (fractions in the schedule are resolved against it)."""
        self.engine.bind(optimizer, total_steps)

    def update_and_allocate(self, step: int) -> bool:
        """Call after each ``optimizer.step()``, before ``zero_grad()``, with the number of optimizer steps done
        (1, 2, ...): commits the mergeable input adaptation's statistics, updates the importance scores in the
        steps leading to a re-allocation and re-allocates ranks when the schedule says so. Returns whether ranks
        were re-allocated.

        With ``init="gradient"`` or ``"lora-ga"`` the first step's loss gradient of each layer's weight sets where
        its components start (the adapters' own update of that step is replaced), and a re-allocation step's sets
        where grown components start."""
        return self.engine.step(step)

    def skip_step(self) -> None:
        """Call instead of :meth:`update_and_allocate` for a step whose update was skipped (e.g. a non-finite
        loss): its input statistics and measured gradients are dropped and no score or allocation sees it."""
        self.engine.skip()

    def allocation_events(self) -> list[dict[str, Any]]:
        """Every re-allocation so far, oldest first: ``{"step", "ranks", "scores"}`` (empty for a static LoRA)."""
        return [dict(e) for e in self.engine.events]

    def engine_state_dict(self) -> dict[str, Any]:
        """The engine's state (scores, ranks, budget, events, growth RNG; empty for a static allocation): what a
        checkpoint holds beside the weights so that the allocation resumes exactly."""
        return self.engine.state_dict()

    def load_engine_state_dict(self, state: dict[str, Any], restore_ranks: bool = False) -> None:
        """Restore :meth:`engine_state_dict`; ``restore_ranks``: set each layer's rank from it, for weights restored
        from a whole :meth:`state_dict` (as ``transformers.Trainer`` checkpoints hold)."""
        self.engine.load_state_dict(state, restore_ranks=restore_ranks)

    @property
    def reallocates(self) -> bool:
        """Whether the engine moves rank between layers (False for a static allocation, such as static LoRA)."""
        return self.engine.allocator is not None

    def reallocation_due_by(self, step: int) -> bool:
        """Whether the schedule has a re-allocation at or before optimizer step ``step``."""
        return self.engine.reallocation_due_by(step)

    def budget_trainable_parameters(self) -> int:
        """Trainable parameters once the ranks are within the budget: an over-parameterised start (``start_ratio``)
        is pruned to at most this many, the size a run is compared at; :meth:`trainable_parameters` otherwise."""
        over = self.engine.total_cost() - self.engine.budget if self.engine.budget is not None else 0
        return self.trainable_parameters() - max(over, 0)

    def importance(self) -> dict[str, float]:
        """Module name -> current importance score of this process (empty for a static LoRA). Local: safe to call
        from one process only, e.g. for logging."""
        return self.engine.importance()

    # --- merge -------------------------------------------------------------------------------------------------

    def merge_and_unload(self) -> nn.Module:
        """Merge the adapters and return the plain Hugging Face model, with no Dynamic LoRA module left in it."""
        self._check_not_unloaded()
        self.merge_adapter()  # all or none: refused before any layer changes
        for name, module in self._adapted.items():
            replace_module(self.model, name, module.base_layer)
        self.unloaded = True
        return self.model

    def _check_not_unloaded(self) -> None:
        if self.unloaded:
            raise RuntimeError("merge_and_unload() was already called: this wrapper no longer has adapters")

    # --- save / load (serialization.py) ------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter at its active ranks (input adaptation included) plus the modules to save, as contiguous
        CPU tensors."""
        return adapter_tensors(self._layers, self.model, self.saved_module_names)

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load tensors written by :meth:`adapter_state_dict` (active ranks must already be set)."""
        load_adapter_tensors(self._layers, self.model, self.saved_module_names, state)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``dynlora_model.safetensors`` and ``dynlora_config.json`` (see serialization.py)."""
        self._check_not_unloaded()
        write_adapter(save_directory, self.dynlora_config, self._layers, self.model, self.saved_module_names)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_directory: str | os.PathLike) -> DynamicLoRAModel:
        """Rebuild the adapter saved by :meth:`save_pretrained` on ``model`` (a fresh copy of the same base model).

        Every mismatch (another model family, a missing layer, a tensor of the wrong shape, missing or extra
        tensors) is an error, never a silently disabled adapter.
        """
        meta = read_adapter_meta(adapter_directory)
        specs = saved_specs(model, meta, Path(adapter_directory))
        config = DynamicLoRAConfig.from_dict(written_settings(meta["config"]))
        wrapped = cls(model, config, _specs=specs, _saved_modules=list(meta["modules_to_save"]))
        wrapped.set_ranks({n: int(v["rank"]) for n, v in meta["layers"].items()})
        wrapped.load_adapter_state_dict(read_adapter_weights(adapter_directory))
        apply_class_names(model, meta.get("labels"))
        wrapped.engine.started = True  # trained components: never re-started along a gradient
        return wrapped

    def export_peft(self, save_directory: str | os.PathLike) -> None:
        """Write a standard PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads (see export.py)."""
        self._check_not_unloaded()
        export_peft(self, save_directory)


def get_dynlora_model(model: nn.Module, config: DynamicLoRAConfig | None = None) -> DynamicLoRAModel:
    """Inject Dynamic LoRA layers into ``model`` (in place), freeze its base weights, return the wrapper."""
    return DynamicLoRAModel(model, config or DynamicLoRAConfig())
