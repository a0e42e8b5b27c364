"""The data a run trains and evaluates on, chosen from its settings: a GLUE task or the user's files."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from .custom import load_custom
from .glue import ENV_GLUE_DIR, Example, load_glue, task_spec

if TYPE_CHECKING:
    from ..settings import TrainSettings

# The `dynlora` command's default GLUE folder when neither --data-dir nor $DYNLORA_GLUE_DIR is given: this
# repository's checkout layout, the shared data folder beside the repo (used when it exists).
CHECKOUT_GLUE_DIR = Path("..") / "shared" / "data" / "glue"


@dataclass
class TaskData:
    """Examples by split (``train`` plus the evaluation splits), label names in id order (None for regression), and
    which GLUE metric scores it (user files: accuracy, or Pearson/Spearman for regression)."""

    splits: dict[str, list[Example]]
    labels: tuple[str, ...] | None
    regression: bool
    metric_task: str

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.labels or ())


def load_task_data(settings: TrainSettings) -> TaskData:
    if settings.train_file:
        if not settings.dev_file:
            raise DataError("--train-file needs --dev-file too (the evaluation data)")
        cols = (settings.text_col, settings.text_pair_col, settings.label_col)
        train, labels = load_custom(settings.train_file, *cols, regression=settings.regression)
        dev, _ = load_custom(settings.dev_file, *cols, labels=labels, regression=settings.regression)
        metric = "stsb" if settings.regression else "sst2"
        return TaskData({"train": train, "validation": dev}, labels, settings.regression, metric)
    spec = task_spec(settings.task)
    return TaskData(
        load_glue(spec.name, command_glue_dir(settings.data_dir)), spec.labels, spec.is_regression, spec.name
    )


def command_glue_dir(data_dir: str | None) -> str | None:
    """The GLUE folder of the ``dynlora`` command: ``data_dir``, else $DYNLORA_GLUE_DIR, else this checkout's
    ``../shared/data/glue`` when it exists (else None: the hub)."""
    if data_dir is None and not os.environ.get(ENV_GLUE_DIR) and CHECKOUT_GLUE_DIR.is_dir():
        return str(CHECKOUT_GLUE_DIR)
    return data_dir


def subset(examples: list, limit: int | None, seed: int) -> list:
    """A random subset of ``limit`` examples in their original order (all when ``limit`` is None)."""
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]
