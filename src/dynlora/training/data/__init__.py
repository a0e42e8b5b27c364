"""Task data: the GLUE TSV release, user CSV/JSONL files, tokenisation with per-batch padding."""

from ..errors import DataError
from .custom import load_custom
from .glue import TASKS, Example, TaskSpec, load_glue, read_tsv, resolve_glue_dir, task_spec
from .loader import BatchStream, batches, collate, epoch_order, tokenize
from .splits import TaskData, load_task_data

__all__ = [
    "TASKS",
    "BatchStream",
    "DataError",
    "Example",
    "TaskData",
    "TaskSpec",
    "batches",
    "collate",
    "epoch_order",
    "load_custom",
    "load_glue",
    "load_task_data",
    "read_tsv",
    "resolve_glue_dir",
    "task_spec",
    "tokenize",
]
