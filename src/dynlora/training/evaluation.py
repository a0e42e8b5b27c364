"""Scoring a model on tokenised examples with the task's official GLUE metrics."""

from __future__ import annotations

import torch
from torch import nn

from .data import batches
from .devices import to_device
from .metrics import glue_metrics


@torch.no_grad()
def evaluate(
    model: nn.Module, features: list[dict], metric_task: str, regression: bool, batch_size: int, pad_token_id: int
) -> dict[str, float]:
    """GLUE metrics of ``model`` (left in eval mode) on tokenised ``features``."""
    model.eval()
    device = next(model.parameters()).device
    preds, gold = [], []
    for batch in batches(features, range(len(features)), batch_size, pad_token_id):
        labels = batch.pop("labels")
        batch = to_device(batch, device)
        logits = model(**batch).logits
        preds += (logits.float().squeeze(-1) if regression else logits.argmax(-1)).tolist()
        gold += labels.tolist()
    return glue_metrics(metric_task, preds, gold)
