"""Tokenise once, pad per batch: short sentences are never padded to --max-length."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .glue import Example

IGNORE = -100  # label of a token that carries no loss (the convention of transformers' loss functions)


def tokenize(examples: Sequence[Example], tokenizer, max_length: int) -> list[dict]:
    """Features (input_ids, attention_mask, token_type_ids where the model has them, labels), not padded."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples] if examples and examples[0].text_pair is not None else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = list(encoded.keys())
    return [{**{k: encoded[k][i] for k in keys}, "labels": e.label} for i, e in enumerate(examples)]


def collate(features: Sequence[dict], pad_token_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to ``width``, by default the longest sequence of this batch (right padding); token labels (a language
    model's) pad with IGNORE, so padding carries no loss."""
    width = width or max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key == "document":  # which document a language-model block came from: for reports, not the model
            continue
        if key == "labels" and isinstance(features[0]["labels"], list):
            batch["labels"] = torch.tensor([f["labels"] + [IGNORE] * (width - len(f["labels"])) for f in features])
            continue
        if key == "labels":
            dtype = torch.float32 if isinstance(features[0]["labels"], float) else torch.long
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=dtype)
            continue
        fill = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of an epoch: a function of (seed, epoch) only, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def eval_batch_starts(count: int, batch_size: int) -> Iterable[int]:
    """Where each evaluation batch of ``count`` rows starts: a progress bar on a terminal (tqdm shows none
    elsewhere), erased when done so that the command's output stays as it was."""
    starts = range(0, count, batch_size)
    return tqdm(starts, desc="evaluating", unit="batch", leave=False, disable=None, dynamic_ncols=True)


class BatchStream:
    """A run's training micro-batches: micro-batch ``k`` is a pure function of (seed, k), so a resumed run sees
    exactly the batches an uninterrupted one would. Under several processes each takes its shard of every batch."""

    def __init__(
        self,
        features: Sequence[dict],
        batch_size: int,
        seed: int,
        pad_token_id: int,
        process_index: int = 0,
        world: int = 1,
    ) -> None:
        self.features, self.seed, self.pad_token_id = features, seed, pad_token_id
        self.size, self.process_index, self.world = batch_size * world, process_index, world
        self.per_epoch = -(-len(features) // self.size)
        self._order: tuple[int, list[int]] | None = None

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        epoch, b = divmod(k, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.features), self.seed, epoch))
        chunk = [self.features[i] for i in self._order[1][b * self.size : (b + 1) * self.size]]
        # Every process pads to the global batch's width: its shard is then rows of the batch one process would
        # see, and the input statistics (which see padding) are the same whatever the number of processes.
        width = max(len(f["input_ids"]) for f in chunk)
        return collate(chunk[self.process_index :: self.world], self.pad_token_id, width)
