"""What a training run needs of an adapter method: the protocols every method implements (methods.py,
peft_baselines.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config import DynamicLoRAConfig


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
    def make_optimizer(
        self, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
    ) -> torch.optim.Optimizer: ...


# The first training batches (labels dropped), for a method that starts from data (EVA).
SampleBatches = Callable[[], Iterable[dict[str, torch.Tensor]]]


class Method(Protocol):
    name: str

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        """The adapter settings this method really uses: what a checkpoint must agree on to resume."""
        ...

    def wrap(
        self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int, batches: SampleBatches | None = None
    ) -> AdaptedModel: ...


def adamw(
    model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: every method's optimizer unless it says otherwise. With
    ``loraplus_lr_ratio``, LoRA+ (PEFT's ``create_loraplus_optimizer``): every ``lora_B`` and 1-d parameter at
    that multiple of ``lr``, all groups at ``weight_decay``."""
    if loraplus_lr_ratio is None:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    # PEFT sets each group's weight decay from loraplus_weight_decay (default 0), not from weight_decay.
    return create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, loraplus_weight_decay=weight_decay
    )
