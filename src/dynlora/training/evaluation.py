"""Scoring a model on tokenised examples: a classifier's predictions (which the task scores with its official GLUE
metrics), and a language model's loss per token on the tokens that carry one."""

from __future__ import annotations

import math

import torch
from torch import nn

from .data.loader import IGNORE, collate, eval_batch_starts
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


def language_metrics(model: nn.Module, features: list[dict], batch_size: int, pad_token_id: int) -> dict[str, float]:
    """Mean loss over the tokens that carry one, its perplexity, and ``main`` = −loss (higher is better)."""
    sums, counts = token_losses(model, features, batch_size, pad_token_id)
    return loss_metrics(float(sums.sum()), int(counts.sum()))


def loss_metrics(total: float, tokens: int) -> dict[str, float]:
    """From a summed loss over ``tokens`` tokens: the mean loss, its perplexity and ``main`` = −loss."""
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "main": -loss}


@torch.no_grad()
def token_losses(
    model: nn.Module, features: list[dict], batch_size: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature, the summed loss (nats) of its tokens that carry one and how many they are: [features] each."""
    model.eval()
    device = next(model.parameters()).device
    sums, counts = [], []
    for start in eval_batch_starts(len(features), batch_size):
        batch = to_device(collate(features[start : start + batch_size], pad_token_id), device)
        targets = batch.pop("labels")[:, 1:]
        keep = targets != IGNORE  # [rows, seq - 1]
        # float32 for the tokens that carry a loss only, not a copy of the whole [rows, seq, vocab]
        logits = model(**batch).logits[:, :-1][keep].float()  # [kept tokens, vocab]
        nll = nn.functional.cross_entropy(logits, targets[keep], reduction="none")
        row = keep.nonzero()[:, 0]  # the row of each kept token
        sums.append(torch.zeros(len(keep), device=device).index_add_(0, row, nll))
        counts.append(keep.sum(-1))
    return torch.cat(sums).double().cpu(), torch.cat(counts).cpu()  # one read from the device, at the end
