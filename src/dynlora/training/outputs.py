"""What a run leaves in its directory besides its checkpoints and log: the best evaluated adapter (``best/``), the
final one (``adapter/``) and ``results.json``, each written whole or not at all, by the first process only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import replace_directory, write_json
from .full_finetuning import FullAdapted
from .metrics import run_score
from .protocols import AdaptedModel
from .run_facts import write_run_facts


class RunOutputs:
    def __init__(
        self,
        out: Path,
        writer: bool,
        adapted: AdaptedModel,
        tokenizer: Any,
        prompt_format: str | None,
        max_length: int,
    ) -> None:
        self.out, self.writer, self.adapted, self.tokenizer = out, writer, adapted, tokenizer
        self.prompt_format, self.max_length = prompt_format, max_length

    def save_adapter(self, directory: Path) -> None:
        """The adapter in its method's format, with what the run knows of its inputs (run_facts.py); a whole model
        (``--method full``) with its tokenizer too, so that it loads as a plain transformers model."""
        self.adapted.save(directory)
        if isinstance(self.adapted, FullAdapted):
            self.tokenizer.save_pretrained(str(directory))
        write_run_facts(directory, self.prompt_format, self.max_length)

    def keep_best(self, best: dict[str, Any] | None, step: int, metrics: dict[str, dict[str, float]]) -> dict | None:
        """The best evaluation after ``metrics`` at ``step``: it replaces ``best`` (and ``best/``) if it scores
        higher."""
        score = run_score(metrics)
        if best is not None and score <= best["score"]:
            return best
        best = {"score": score, "step": step, "metrics": metrics}
        if self.writer:

            def write(tmp: Path) -> None:
                self.save_adapter(tmp)
                write_json(tmp / "metrics.json", best)

            replace_directory(self.out / "best", write)
        return best

    def write_final(self, result: dict[str, Any]) -> None:
        """``results.json`` and the final adapter."""
        if self.writer:
            write_json(self.out / "results.json", result)
            replace_directory(self.out / "adapter", self.save_adapter)
