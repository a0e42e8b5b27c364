"""Task data: the GLUE TSV release, user CSV/JSONL files, tokenisation with per-batch padding."""

from .custom import load_custom
from .glue import TASKS, DataError, Example, TaskSpec, load_glue, read_tsv, resolve_glue_dir, task_spec
from .loader import batches, collate, epoch_order, tokenize

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "TaskSpec",
    "batches",
    "collate",
    "epoch_order",
    "load_custom",
    "load_glue",
    "read_tsv",
    "resolve_glue_dir",
    "task_spec",
    "tokenize",
]
