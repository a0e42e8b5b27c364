"""The adapter methods a training run can use, at an equal trainable adapter budget, behind one protocol.

- ``dynamic``: Dynamic LoRA as configured (re-allocation, input adaptation, components started along the loss
  gradient), budget of LoRA at ``rank``; ``reallocate: false`` keeps the rest with a static allocation.
- ``lora``: dynlora's static LoRA on the same layers at ``rank``: :func:`dynlora.static_lora` of the config.
- the PEFT baselines of peft_baselines.py: ``peft-lora``, ``peft-adalora``, ``peft-rslora``, ``peft-loraplus``,
  ``peft-eva`` (PEFT's own implementations);
- ``full``: every weight trains, no adapter (full_finetuning.py): the ceiling, at no equal budget.

Every adapter method reads its rank, alpha, dropout, targets and modules to save from the same DynamicLoRAConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DynamicLoRAConfig, engine_settings, static_lora
from ..model import DynamicLoRAModel, get_dynlora_model
from .full_finetuning import Full
from .peft_baselines import PEFT_METHODS
from .protocols import AdaptedModel, Method, SampleBatches, adamw
from .settings import METHODS

__all__ = ["METHODS", "AdaptedModel", "Method", "get_method"]


# --- dynlora: dynamic and static LoRA ------------------------------------------------------------------------------


class DynLoRAAdapted:
    def __init__(self, model: DynamicLoRAModel) -> None:
        self.model = model

    def bind(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        self.model.bind_optimizer(optimizer, total_steps)

    def after_step(self, step: int) -> list[dict[str, Any]]:
        return self.model.allocation_events()[-1:] if self.model.update_and_allocate(step) else []

    def skip_step(self) -> None:
        self.model.skip_step()

    def ranks(self) -> dict[str, int]:
        return self.model.rank_pattern()

    def allocation_events(self) -> list[dict[str, Any]]:
        return self.model.allocation_events()

    def training_tensors(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()  # DynamicLoRAModel's state dict is its training state

    def load_training_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(tensors)

    def trainable_parameters(self) -> int:
        return self.model.trainable_parameters()

    def save(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.model.engine_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The checkpoint restored the factors as stored; set the ranks the engine recorded.
        self.model.load_engine_state_dict(state["engine"], restore_ranks=True)

    def make_optimizer(
        self, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
    ) -> torch.optim.Optimizer:
        return adamw(self.model, lr, weight_decay, loraplus_lr_ratio)


@dataclass(frozen=True)
class DynLoRA:
    name: str
    dynamic: bool

    def config(self, config: DynamicLoRAConfig) -> DynamicLoRAConfig:
        return config if self.dynamic else static_lora(config)

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        used = self.config(config).to_dict()
        return used if self.dynamic else {k: v for k, v in used.items() if k not in engine_settings()}

    def wrap(
        self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int, batches: SampleBatches | None = None
    ) -> DynLoRAAdapted:
        return DynLoRAAdapted(get_dynlora_model(base, self.config(config)))


_METHODS: dict[str, Method] = {
    "dynamic": DynLoRA("dynamic", dynamic=True),
    "lora": DynLoRA("lora", dynamic=False),
    **{m.name: m for m in PEFT_METHODS},
    "full": Full(),
}


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return _METHODS[name]
