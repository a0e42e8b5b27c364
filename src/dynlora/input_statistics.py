"""The statistics of a model's InputNorm layers (input_adaptation.py) kept together: committed after each optimizer
step for all layers at once, folded into the running averages every ``input_norm_every`` steps."""

from __future__ import annotations

import torch

from .distributed import in_process_group
from .input_adaptation import InputNorm, feature_scales


def folds_at(step: int, every: int) -> bool:
    """Whether the block is folded after optimizer step ``step``: the first, then every ``every``-th."""
    return step == 1 or step % every == 0


def _block_steps(step: int, every: int) -> int:
    """Steps in the block folded after ``step``: those since the previous fold."""
    return step - (0 if step == 1 else max(1, step - every))


class InputStatistics:
    """The statistics of a model's :class:`InputNorm` layers, committed after each step and folded in together.

    The buffers of the layers of one input width (and settings) are rows of one tensor per buffer (``[n, d]``,
    ``[n]``), and each module's buffer is a view of its row. So a commit is two additions per group and a fold a
    few batched operations, whatever the number of layers (the 210 layers of a 30-block LLM are 2 groups); per
    layer, at ~10 µs an operation on a CPU, the commit alone would cost 4 ms a step. State dicts, loads and
    ``model.to`` work on the modules as before; when a move or a load by assignment replaced their buffers, the
    next commit groups them again. Nothing is read back to the host."""

    def __init__(self, norms: list[InputNorm]) -> None:
        self.groups: dict[tuple, list[InputNorm]] = {}
        for norm in norms:
            self.groups.setdefault((norm.mean_sq.numel(), norm.momentum, norm.eps, norm.strength), []).append(norm)
        self._rows: dict[tuple, dict[str, torch.Tensor]] = {}
        self._grouped()

    def _grouped(self, every_buffer: bool = True) -> list[tuple[tuple, list[InputNorm], dict[str, torch.Tensor]]]:
        """Each group's settings, layers and row tensors, grouping again the layers whose buffers were replaced
        (a move replaces them all, a load by assignment the saved ones; an ordinary step checks the two it
        writes)."""
        out = []
        for key, norms in self.groups.items():
            rows = self._rows.get(key)
            checked = tuple(norms[0]._buffers) if every_buffer else ("pending_sum", "block_sum")
            if rows is None or any(n._buffers[b]._base is not rows[b] for b in checked for n in norms):
                rows = {b: torch.stack([n._buffers[b] for n in norms]) for b in norms[0]._buffers}
                for i, norm in enumerate(norms):
                    for b in rows:
                        norm._buffers[b] = rows[b][i]
                self._rows[key] = rows
            out.append((key, norms, rows))
        return out

    def discard(self) -> None:
        """Forget the pending statistics of a step that was skipped (e.g. a non-finite loss)."""
        self._discard(self._grouped())

    @staticmethod
    def _discard(groups: list[tuple[tuple, list[InputNorm], dict[str, torch.Tensor]]]) -> None:
        for _key, norms, rows in groups:
            rows["pending_sum"].zero_()
            for norm in norms:
                norm.pending_tokens.value = 0

    @torch.no_grad()
    def commit(self, step: int = 1, every: int = 1) -> None:
        """After optimizer step ``step``: move every layer's pending statistics into its block, and on a fold step
        (:func:`folds_at`) fold the blocks in. Under torch.distributed each step's sums and token counts are summed
        over processes in one all-reduce before they join the block, so every process holds the same block (and a
        checkpoint written by one resumes all)."""
        fold = folds_at(step, every)
        groups = self._grouped(every_buffer=fold)
        if not groups:
            return
        sums = [rows["pending_sum"] for _key, _norms, rows in groups]
        device = sums[0].device
        counts = [_token_counts([n.pending_tokens.value for n in norms], device) for _k, norms, _r in groups]
        if in_process_group():
            packed = torch.cat([t.view(-1) for t in sums + counts])
            torch.distributed.all_reduce(packed)
            parts = packed.split([t.numel() for t in sums + counts])
            sums = [p.view_as(t) for p, t in zip(parts[: len(sums)], sums, strict=True)]
            counts = list(parts[len(sums) :])
        for (_key, _norms, rows), s, c in zip(groups, sums, counts, strict=True):
            rows["block_sum"] += s
            rows["block_count"] += c
        self._discard(groups)
        if fold:
            for (_width, momentum, eps, strength), _norms, rows in groups:
                _fold(rows, momentum, eps, strength, _block_steps(step, every))


def _token_counts(values: list[int], device: torch.device) -> torch.Tensor:
    """The layers' token counts on the device: a fill when they are equal, as when every layer saw every forward,
    which copies nothing from the host (a ``torch.tensor`` of a list would, and on CUDA wait for the device)."""
    if len(set(values)) == 1:
        return torch.full((len(values),), float(values[0]), device=device)
    return torch.tensor([float(v) for v in values], device=device)


@torch.no_grad()
def _fold(rows: dict[str, torch.Tensor], momentum: float, eps: float, strength: float, steps: int) -> None:
    """Fold a block of ``steps`` steps' statistics (x² summed over ``block_count`` tokens) into a group's running
    mean, rms² ← lerp(rms², block mean, 1 − (1 − m)^steps), and empty the block; a layer with no tokens or a
    non-finite mean keeps its statistics."""
    momentum = momentum if steps == 1 else 1.0 - (1.0 - momentum) ** steps
    counts, mean_sq, initialized = rows["block_count"], rows["mean_sq"], rows["initialized"]
    batch = rows["block_sum"] / counts.clamp(min=1.0)[:, None]
    keep = torch.isfinite(batch).all(dim=1) & (counts > 0)
    updated = torch.where(initialized[:, None], torch.lerp(mean_sq, batch, momentum), batch)
    mean_sq.copy_(torch.where(keep[:, None], updated, mean_sq))
    initialized |= keep
    rows["cached_scale"].copy_(feature_scales(mean_sq, initialized, eps, strength))
    rows["block_sum"].zero_()
    rows["block_count"].zero_()
