"""The adapter methods a training run can use, at an equal trainable adapter budget, behind one protocol.

- ``dynamic``: Dynamic LoRA as configured (re-allocation, input adaptation, components started along the loss
  gradient), budget of LoRA at ``rank``; ``reallocate: false`` keeps the rest with a static allocation.
- ``lora``: dynlora's static LoRA on the same layers at ``rank``: :func:`dynlora.static_lora` of the config.
- ``peft-lora``: PEFT's LoRA at ``rank`` (the baseline users have today).
- ``peft-adalora``: PEFT's AdaLoRA from ``1.5 × rank`` down to ``rank`` (its final budget equals the others').

Every method reads its rank, alpha, dropout, targets and modules to save from the same DynamicLoRAConfig.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config import DynamicLoRAConfig, engine_settings, static_lora
from ..model import DynamicLoRAModel, get_dynlora_model
from ..targets import default_modules_to_save, default_target_modules


class AdaptedModel(Protocol):
    """A base model wrapped by one method, as the training loop drives, checkpoints and saves it."""

    model: nn.Module

    def bind(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None: ...
    def after_step(self, step: int) -> None: ...  # after optimizer step ``step`` (1, 2, ...), before zero_grad
    def skip_step(self) -> None: ...  # instead of after_step, for a step whose update was skipped
    def ranks(self) -> dict[str, int]: ...  # layer -> active rank ({} when the method has no notion of it)
    def allocation_events(self) -> list[dict[str, Any]]: ...  # every re-allocation so far: step, ranks, scores
    def trainable_parameters(self) -> int: ...
    def save(self, directory: str | Path) -> None: ...  # the adapter in the method's own format
    def state_dict(self) -> dict[str, Any]: ...  # what a checkpoint needs beyond the trainable tensors
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Method(Protocol):
    name: str

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        """The adapter settings this method really uses: what a checkpoint must agree on to resume."""
        ...

    def wrap(self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int) -> AdaptedModel: ...


# --- dynlora: dynamic and static LoRA ------------------------------------------------------------------------------


class DynLoRAAdapted:
    def __init__(self, model: DynamicLoRAModel) -> None:
        self.model = model

    def bind(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        self.model.bind_optimizer(optimizer, total_steps)

    def after_step(self, step: int) -> None:
        self.model.update_and_allocate(step)

    def skip_step(self) -> None:
        self.model.skip_step()

    def ranks(self) -> dict[str, int]:
        return self.model.rank_pattern()

    def allocation_events(self) -> list[dict[str, Any]]:
        return self.model.allocation_events()

    def trainable_parameters(self) -> int:
        return self.model.trainable_parameters()

    def save(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.model.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The checkpoint restored every parameter at full capacity; set the ranks the engine recorded.
        self.model.engine.load_state_dict(state["engine"], restore_ranks=True)


@dataclass(frozen=True)
class DynLoRA:
    name: str
    dynamic: bool

    def config(self, config: DynamicLoRAConfig) -> DynamicLoRAConfig:
        return config if self.dynamic else static_lora(config)

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        used = self.config(config).to_dict()
        return used if self.dynamic else {k: v for k, v in used.items() if k not in engine_settings()}

    def wrap(self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int) -> DynLoRAAdapted:
        return DynLoRAAdapted(get_dynlora_model(base, self.config(config)))


# --- PEFT baselines ------------------------------------------------------------------------------------------------

PEFT_SETTINGS = ("target_modules", "rank", "alpha", "dropout", "modules_to_save")


class PeftAdapted:
    def __init__(self, model: nn.Module, adalora: bool) -> None:
        self.model = model
        self.adalora = adalora
        self.allocator = getattr(model.base_model, "rankallocator", None)

    def bind(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        pass  # AdaLoRA's schedule was fixed when it was built

    def after_step(self, step: int) -> None:
        if self.adalora:
            self.model.base_model.update_and_allocate(step)

    def skip_step(self) -> None:
        pass

    def ranks(self) -> dict[str, int]:
        if not self.adalora:
            return {}
        # AdaLoRA masks ranks by zeroing entries of lora_E; the active rank is the count of non-zero entries.
        return {
            n.removesuffix(".lora_E.default"): int((p != 0).sum())
            for n, p in self.model.named_parameters()
            if n.endswith("lora_E.default")
        }

    def allocation_events(self) -> list[dict[str, Any]]:
        return []

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def save(self, directory: str | Path) -> None:
        with warnings.catch_warnings():
            # AdaLoRA may prune a layer to rank 0, which it saves as 0-sized tensors; PEFT then warns that ZeRO-3 /
            # FSDP shards were not gathered, which cannot be the case here.
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            self.model.save_pretrained(str(directory))

    def state_dict(self) -> dict[str, Any]:
        if self.allocator is None:
            return {}
        return {k: dict(getattr(self.allocator, k)) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self.allocator, key, dict(value))
        # AdaLoRA keeps the mask it last applied only in its config, which a restart loses (and after its final
        # step it masks with that, so a resumed run crashed). The mask is exactly the zeroed entries of the
        # restored lora_E, so rebuild it from them, the way PEFT names it.
        params = self.model.base_model.model.named_parameters()
        masks = {n: (p != 0).view(-1).tolist() for n, p in params if "lora_E." in n}
        if not all(all(m) for m in masks.values()):
            self.model.peft_config["default"].rank_pattern = masks


@dataclass(frozen=True)
class Peft:
    name: str
    adalora: bool

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        return {k: getattr(config, k) for k in PEFT_SETTINGS}

    def wrap(self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int) -> PeftAdapted:
        from peft import AdaLoraConfig, LoraConfig, get_peft_model

        targets = config.target_modules if config.target_modules is not None else default_target_modules(base)
        saved = default_modules_to_save(base) if config.modules_to_save is None else config.modules_to_save
        common = dict(
            target_modules=targets, lora_alpha=config.alpha, lora_dropout=config.dropout, modules_to_save=saved or None
        )
        if self.adalora:
            # AdaLoRA's own schedule, in the same fractions as ours: warm up 10 %, fix the budget for the last 20 %.
            peft_config = AdaLoraConfig(
                init_r=max(config.rank + 1, round(1.5 * config.rank)),
                target_r=config.rank,
                total_step=total_steps,
                tinit=int(0.1 * total_steps),
                tfinal=int(0.2 * total_steps),
                deltaT=max(1, int(0.05 * total_steps)),
                **common,
            )
        else:
            peft_config = LoraConfig(r=config.rank, **common)
        return PeftAdapted(get_peft_model(base, peft_config), self.adalora)


_METHODS: dict[str, Method] = {
    "dynamic": DynLoRA("dynamic", dynamic=True),
    "lora": DynLoRA("lora", dynamic=False),
    "peft-lora": Peft("peft-lora", adalora=False),
    "peft-adalora": Peft("peft-adalora", adalora=True),
}
METHODS = tuple(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return _METHODS[name]
