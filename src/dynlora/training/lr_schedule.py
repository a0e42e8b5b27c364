"""A run's learning rate: a linear warm-up, then a linear decay to 0 at the last step, or the peak held."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from .settings import TrainSettings


def make_scheduler(optimizer: torch.optim.Optimizer, settings: TrainSettings, total_steps: int) -> LambdaLR:
    """The schedule of a run of ``total_steps`` optimizer steps (transformers' schedules, as Trainer's)."""
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = int(settings.warmup_ratio * total_steps)
    if settings.lr_schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)


def follow_schedule_from(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, step: int) -> None:
    """Set the optimizer's lr to what ``scheduler`` gives after ``step`` steps: a restored optimizer holds the lr of
    the schedule it was saved with, which an extended run (another length) no longer follows."""
    for group, base, at in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * at(step)
