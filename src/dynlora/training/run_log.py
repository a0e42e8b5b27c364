"""A run's ``log.jsonl`` (one JSON record per line: losses, allocations, evaluations) and its TensorBoard mirror."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"


class RunLog:
    """Appends records to ``directory/log.jsonl``; mirrors losses, metrics and ranks to TensorBoard when it is
    installed. Only the writing process (rank 0 of a distributed run) passes ``enabled=True``."""

    def __init__(self, directory: Path, enabled: bool = True) -> None:
        self.path = Path(directory) / LOG_NAME
        self.enabled = enabled
        self.tensorboard = None

    def open(self, purge_step: int | None = None) -> None:
        """Start writing; ``purge_step``: a resumed run's step, whose later TensorBoard events are dropped (each
        invocation writes its own events file, as TensorBoard does)."""
        if not self.enabled:
            return
        try:  # TensorBoard when installed; the JSONL log is always written
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge_step)
        except ImportError:
            pass

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is None:
            return
        step = record["step"]
        for key in ("loss", "lr"):
            if key in record:
                self.tensorboard.add_scalar(f"train/{key}", record[key], step)
        for split, metrics in record.get("metrics", {}).items():
            for name, value in metrics.items():
                self.tensorboard.add_scalar(f"{split}/{name}", value, step)
        for name, rank in (record.get("ranks") or {}).items():
            self.tensorboard.add_scalar(f"rank/{name}", rank, step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def set_aside(self) -> None:
        """A run killed before its first checkpoint left a log: keep it as ``log.previous.jsonl``."""
        if self.enabled and self.path.exists():
            os.replace(self.path, self.path.with_name("log.previous.jsonl"))

    def truncate(self, step: int) -> None:
        """Drop records past ``step`` (the checkpoint a run resumes from): the resumed run writes them again."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)


def read_log(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / LOG_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
