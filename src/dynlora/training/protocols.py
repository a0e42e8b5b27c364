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
    # After optimizer step ``step`` (1, 2, ...), before zero_grad: the re-allocations it made (step, ranks, scores).
    def after_step(self, step: int) -> list[dict[str, Any]]: ...
    def skip_step(self) -> None: ...  # instead of after_step, for a step whose update was skipped
    def ranks(self) -> dict[str, int]: ...  # layer -> active rank ({} when the method has no notion of it)
    def allocation_events(self) -> list[dict[str, Any]]: ...  # every re-allocation so far: step, ranks, scores
    def trainable_parameters(self) -> int: ...
    def save(self, directory: str | Path) -> None: ...  # the adapter in the method's own format
    # What a checkpoint holds of the model (the tensors that train, and a method's running statistics), and loading
    # it back: a tensor the checkpoint lacks is an error naming it.
    def training_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_training_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
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


def trainable_count(model: nn.Module) -> int:
    """The parameters of ``model`` that train (a tied weight once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor], trained: Iterable[str]) -> None:
    """A checkpoint's ``tensors`` into ``model``; one of the ``trained`` names it lacks is an error naming it."""
    missing = sorted(set(trained) - set(tensors))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors this run trains, e.g. {missing[0]}")
    model.load_state_dict(tensors, strict=False)


def adamw(
    model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: every method's optimizer unless it says otherwise. With
    ``loraplus_lr_ratio``, LoRA+: every adapter's B (``lora_B``) at that multiple of ``lr``, the rest (A, a task
    head, anything else trained) at ``lr``, all at ``weight_decay``.

    Only B: PEFT's ``create_loraplus_optimizer`` also moves every 1-d parameter to B's group, which trains a task
    head's bias at 16 × the lr of its weight."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        return torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=weight_decay)
    groups = [
        {"params": [p for name, p in trainable if "lora_B" not in name], "lr": lr},
        {"params": [p for name, p in trainable if "lora_B" in name], "lr": lr * loraplus_lr_ratio},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
