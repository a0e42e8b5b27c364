"""What a trained adapter's run knew of its inputs, saved beside the adapter (``dynlora_run.json``): how prompts
were written to the model and how long they were cut. ``dynlora eval`` then scores with the run's own
``--max-length`` and ``dynlora generate`` renders a chat turn only for an adapter trained on chat data.
Adapters written by other tools have no such file; the commands then use their own defaults."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io import write_json

RUN_FACTS = "dynlora_run.json"


def write_run_facts(directory: str | Path, prompt_format: str | None, max_length: int) -> None:
    """``prompt_format``: chat (chat JSONL, or a GLUE task posed as an instruction), completion, text,
    documents, or None for a classifier."""
    write_json(Path(directory) / RUN_FACTS, {"prompt_format": prompt_format, "max_length": max_length})


def read_run_facts(adapter: str | Path | None) -> dict[str, Any]:
    """The facts saved with ``adapter``; {} for an adapter saved without them."""
    path = Path(adapter) / RUN_FACTS if adapter else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}
