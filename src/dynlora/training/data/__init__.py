"""Task data: the GLUE TSV release and user CSV/JSONL files (tokenisation and batches: ``loader.py``, which needs
torch; the rest reads files and imports quickly, for the command line)."""

from ..errors import DataError
from .custom import load_custom
from .glue import TASKS, Example, TaskSpec, load_glue, read_tsv, resolve_glue_dir, task_spec
from .splits import TaskData, load_task_data

__all__ = [
    "TASKS",
    "DataError",
    "Example",
    "TaskData",
    "TaskSpec",
    "load_custom",
    "load_glue",
    "load_task_data",
    "read_tsv",
    "resolve_glue_dir",
    "task_spec",
]
