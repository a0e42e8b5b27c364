"""A classifier's predictions on tokenised examples, which the task scores with its official GLUE metrics."""

from __future__ import annotations

import torch
from torch import nn

from .data.loader import collate, eval_batch_starts
from .devices import to_device


@torch.no_grad()
def predict(
    model: nn.Module, features: list[dict], regression: bool, batch_size: int, pad_token_id: int
) -> tuple[list[float], list[float]]:
    """``model``'s prediction for each of the tokenised ``features`` (a class id, or a score when ``regression``),
    and their gold labels; the model is left in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    preds, gold = [], []
    for start in eval_batch_starts(len(features), batch_size):
        batch = collate(features[start : start + batch_size], pad_token_id)
        labels = batch.pop("labels")
        batch = to_device(batch, device)
        logits = model(**batch).logits
        preds += (logits.float().squeeze(-1) if regression else logits.argmax(-1)).tolist()
        gold += labels.tolist()
    return preds, gold
