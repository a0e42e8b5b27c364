"""What a training run is built from: its task and data, the base model on its device, the adapter method."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ALL_LINEAR, DynamicLoRAConfig
from .base_model import BaseModel, quantized_loading
from .data.loader import BatchStream
from .devices import to_device
from .methods import get_method
from .protocols import AdaptedModel
from .settings import TrainSettings
from .tasks import Task, load_task


@dataclass
class RunParts:
    """What a training run trains and how long: built by :func:`build_parts`."""

    settings: TrainSettings  # as given, with the batch size and max length left out filled in for the model
    task: Task
    tokenizer: Any
    stream: BatchStream  # the training micro-batches
    eval_sets: dict[str, list]
    adapted: AdaptedModel
    total_steps: int


def build_parts(
    s: TrainSettings,
    device: torch.device,
    dtype: torch.dtype | None,
    process_index: int = 0,
    world: int = 1,
    task: Task | None = None,
    base: BaseModel | None = None,
) -> RunParts:
    """The parts of a run of ``s`` computing on ``device`` in ``dtype`` as process ``process_index`` of ``world``,
    made in the order that makes a seed reproduce a run: data and base model first, the adapter's initialisation
    from a fresh seed. ``task`` and ``base`` are loaded from the settings unless given."""
    random.seed(s.seed)
    torch.manual_seed(s.seed)
    task = task if task is not None else load_task(s)
    bits = 4 if s.load_in_4bit else 8 if s.load_in_8bit else None
    base = base if base is not None else task.load_model(s.model, **quantized_loading(bits, device, dtype))
    limit = getattr(base.model.config, "max_position_embeddings", None)
    s = s.sized(task.prompt_format is not None, limit)  # the sizes left out, for this model
    if limit and s.max_length > limit:
        raise ValueError(f"--max-length {s.max_length} is more than the model takes ({limit} positions)")
    train = task.train_features(base, s)
    eval_sets = task.eval_sets(base.tokenizer, s)
    stream = BatchStream(train, s.batch_size, s.seed, base.tokenizer.pad_token_id, process_index, world)
    per_step = s.batch_size * s.grad_accum * world
    total_steps = s.max_steps or max(1, math.ceil(s.epochs * len(train) / per_step))

    torch.manual_seed(s.seed)  # adapter init does not depend on how much data was tokenised
    if not getattr(base.model, "is_quantized", False):  # a quantised base was loaded onto its device
        base.model.to(device)  # before wrapping: the adapters and the engine's state are made where it is
    batches = first_batches(stream, device)
    adapted = get_method(s.method).wrap(base.model, adapter_config(s.adapter, task), total_steps, batches)
    return RunParts(s, task, base.tokenizer, stream, eval_sets, adapted, total_steps)


def adapter_config(config: DynamicLoRAConfig, task: Task) -> DynamicLoRAConfig:
    """The adapter settings a run wraps its model with: a language model (a task that writes prompts) gets every
    linear projection when no target is given, as LLM fine-tuning recipes do (QLoRA, PEFT's ``all-linear``); a
    classifier gets its family's default targets."""
    if config.target_modules is None and task.prompt_format is not None:
        return dataclasses.replace(config, target_modules=ALL_LINEAR)
    return config


def first_batches(stream: BatchStream, device: torch.device):
    """The first epoch's micro-batches without their labels, on ``device`` (what a method that starts from data,
    EVA, reads)."""

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for k in range(stream.per_epoch):
            yield to_device({key: value for key, value in stream[k].items() if key != "labels"}, device)

    return batches
