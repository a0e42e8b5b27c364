"""Scoring a GLUE task posed to a chat model (data/instruct.py): which answer word the model finds likeliest after
each question. The model is never asked to generate, so an answer it words differently cannot be misread."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .data.glue import Example, TaskSpec
from .data.instruct import conversation, instruction
from .data.lm import IGNORE, render_chat
from .data.loader import collate, eval_batch_starts
from .devices import to_device


def choose_answers(
    model: nn.Module, tokenizer: Any, spec: TaskSpec, examples: list[Example], batch_size: int
) -> list[int]:
    """For each example, the label whose answer turn (as the chat template writes it) is likeliest after the user's
    question (:func:`answer_scores`)."""
    return answer_scores(model, tokenizer, spec, examples, batch_size).argmax(-1).tolist()


@torch.no_grad()
def answer_scores(
    model: nn.Module, tokenizer: Any, spec: TaskSpec, examples: list[Example], batch_size: int
) -> torch.Tensor:
    """[examples, answers]: the log-likelihood of each label's answer turn after each example's question.

    When every answer begins with its own token (one-word answers do), one forward pass of the question scores them
    all: the log-probability of each answer's first token at the question's end, as multiple-choice evaluations of
    LLMs do. Otherwise each answer is scored whole, one forward pass per answer: the sum of its tokens'
    log-probabilities."""
    model.eval()
    answers = instruction(spec).answers
    prompts, answer_ids = [], []  # per example: the question's tokens, and each label's answer tokens
    for example in examples:
        ids = []
        for label in range(len(answers)):
            text, spans = render_chat(conversation(spec, Example(example.text, example.text_pair, label)), tokenizer)
            ids.append(tokenizer(text[spans[0][0] : spans[0][1]], add_special_tokens=False)["input_ids"])
        prompts.append(tokenizer(text[: spans[0][0]], add_special_tokens=False)["input_ids"])
        answer_ids.append(ids)
    device = next(model.parameters()).device
    if all(len({a[0] for a in ids}) == len(ids) for ids in answer_ids):
        return _first_token_scores(model, prompts, answer_ids, batch_size, tokenizer.pad_token_id, device)
    rows = [(i, label) for i in range(len(examples)) for label in range(len(answers))]
    scores = torch.full((len(examples), len(answers)), -math.inf)
    for start in eval_batch_starts(len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        features = []
        for i, label in chunk:
            prompt, answer = prompts[i], answer_ids[i][label]
            ids = prompt + answer
            features.append(
                {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * len(prompt) + answer}
            )
        batch = to_device(collate(features, tokenizer.pad_token_id), device)
        labels = batch.pop("labels")[:, 1:]
        answer = labels != IGNORE  # [rows, seq - 1]
        # Only the answer tokens' distributions in float32: the whole sequence's would be a float32 copy of
        # [rows, seq, vocab] (gigabytes for a 128k vocabulary), to keep a few tokens a row.
        logprobs = model(**batch).logits[:, :-1][answer].float().log_softmax(-1)  # [answer tokens, vocab]
        picked = torch.zeros(labels.shape, device=labels.device)
        picked[answer] = logprobs.gather(-1, labels[answer].unsqueeze(-1)).squeeze(-1)
        for (i, label), score in zip(chunk, picked.sum(-1).tolist(), strict=True):
            scores[i, label] = score
    return scores


def _first_token_scores(
    model: nn.Module, prompts: list[list[int]], answer_ids: list, batch_size: int, pad_token_id: int, device
) -> torch.Tensor:
    """[prompts, answers]: each answer's first-token log-probability right after its prompt, one pass per prompt."""
    scores = []
    for start in eval_batch_starts(len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        features = [{"input_ids": p, "attention_mask": [1] * len(p)} for p in chunk]
        batch = to_device(collate(features, pad_token_id), device)
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)
        logits = model(**batch).logits[torch.arange(len(chunk), device=device), last]  # [rows, vocab]
        first = torch.tensor([[a[0] for a in ids] for ids in answer_ids[start : start + batch_size]], device=device)
        scores.append(logits.float().log_softmax(-1).gather(-1, first))
    return torch.cat(scores).cpu()  # one read from the device, at the end
