"""Full fine-tuning (``--method full``): every weight of the model trains, no adapter. It is the ceiling an adapter
method is measured against, at the cost of one optimizer state per weight (AdamW: two floats per parameter).

What a run saves is a whole model, not an adapter: ``save_pretrained``'s ``config.json`` and ``model.safetensors``
(the run adds the tokenizer, outputs.py), so the directory loads as a plain transformers model
(``from_pretrained(dir)``) and ``dynlora eval --adapter dir`` scores it. There is nothing to merge or export, and
nothing to quantise: a 4- or 8-bit base cannot be trained weight by weight (settings.py refuses it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DynamicLoRAConfig
from .protocols import SampleBatches, adamw, load_trained, trainable_count


class FullAdapted:
    """The model itself, every parameter trainable, in float32: a checkpoint stored in bf16 (most LLMs') loads in
    bf16, where AdamW's small updates round away; ``--precision bf16`` computes in bf16 under autocast, as mixed
    precision does, over these float32 weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.float()
        model.requires_grad_(True)

    def bind(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        pass

    def after_step(self, step: int) -> list[dict[str, Any]]:
        return []

    def skip_step(self) -> None:
        pass

    def ranks(self) -> dict[str, int]:
        return {}

    def allocation_events(self) -> list[dict[str, Any]]:
        return []

    def training_tensors(self) -> dict[str, torch.Tensor]:
        # named_parameters lists a tied weight once (a language model's output layer is its input embedding):
        # a checkpoint cannot hold one storage under two names
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def load_training_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_trained(self.model, tensors, self.training_tensors())

    def trainable_parameters(self) -> int:
        return trainable_count(self.model)

    def save(self, directory: str | Path) -> None:
        self.model.save_pretrained(str(directory))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def make_optimizer(
        self, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
    ) -> torch.optim.Optimizer:
        return adamw(self.model, lr, weight_decay)  # no adapter B to speed up: settings.py refuses the ratio


@dataclass(frozen=True)
class Full:
    name: str = "full"

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        return {}  # no adapter setting changes what trains

    def wrap(
        self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int, batches: SampleBatches | None = None
    ) -> FullAdapted:
        return FullAdapted(base)
