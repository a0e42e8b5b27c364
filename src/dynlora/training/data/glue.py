"""GLUE in its original TSV release layout: one reader, a table of the nine tasks' columns and labels.

Files are parsed with tab as the delimiter and no quote handling (GLUE sentences contain bare ``"``), as UTF-8 with
an optional BOM (MRPC starts with one). Every malformed input is a :class:`DataError` naming the file, the line and
what to do: a wrong header, a ragged row, bytes that are not UTF-8, a label outside the task's label set, a
regression target that is not a number, an empty split.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

ENV_GLUE_DIR = "DYNLORA_GLUE_DIR"


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: str | None
    label: int | float


@dataclass(frozen=True)
class TaskSpec:
    """How a GLUE task's TSV files look. Columns are header names, or indices for headerless CoLA."""

    name: str
    folder: str
    text: str | int
    text_pair: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # label strings in id order; None for regression
    header: bool = True
    dev_files: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)
    columns: int | None = None  # exact column count for headerless files

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


# Label orders follow the GLUE release / the `datasets` "glue" builder, so ids agree with models trained there.
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("cola", "CoLA", 3, None, 1, ("0", "1"), header=False, columns=4),
    "sst2": TaskSpec("sst2", "SST-2", "sentence", None, "label", ("0", "1")),
    "mrpc": TaskSpec("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1")),
    "stsb": TaskSpec("stsb", "STS-B", "sentence1", "sentence2", "score", None),
    "qqp": TaskSpec("qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1")),
    "mnli": TaskSpec(
        "mnli",
        "MNLI",
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        dev_files=(("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv")),
    ),
    "qnli": TaskSpec("qnli", "QNLI", "question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": TaskSpec("rte", "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment")),
    "wnli": TaskSpec("wnli", "WNLI", "sentence1", "sentence2", "label", ("0", "1")),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli"}


def task_spec(name: str) -> TaskSpec:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


def resolve_glue_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """``data_dir``, else $DYNLORA_GLUE_DIR; None when neither is given (the caller may then use the hub)."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ[ENV_GLUE_DIR]) if os.environ.get(ENV_GLUE_DIR) else None


def _read_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as e:
        with open(path, "rb") as f:
            line = f.read(e.start).count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from e


def _column(spec: TaskSpec, header: list[str] | None, col: str | int, path: Path) -> int:
    if isinstance(col, int):
        return col
    if header is None or col not in header:
        raise DataError(
            f"{path}: header has no column {col!r} (found: {', '.join(header or [])}); "
            f"is this the {spec.folder} file of the GLUE release?"
        )
    return header.index(col)


def finite_number(raw: object) -> float | None:
    """``raw`` (a number or its text) as a finite float; None when it is not one."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def regression_target(raw: object, where: str) -> float:
    """A regression label as a finite float, or a DataError naming where it was read."""
    value = finite_number(raw)
    if value is None:
        raise DataError(f"{where}: regression target {raw!r} is not a finite number")
    return value


def _label(spec: TaskSpec, raw: str, where: str) -> int | float:
    if spec.labels is None:
        return regression_target(raw, where)
    if raw not in spec.labels:
        raise DataError(f"{where}: label {raw!r} is not one of {spec.name}'s labels {', '.join(spec.labels)}")
    return spec.labels.index(raw)


def read_tsv(spec: TaskSpec, path: str | os.PathLike) -> list[Example]:
    """Read one GLUE TSV file of task ``spec``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} not found; point --data-dir (or ${ENV_GLUE_DIR}) at a GLUE folder holding {spec.folder}/"
        )
    rows = _read_rows(path)
    header = rows[0] if spec.header and rows else None
    body = rows[1:] if spec.header else rows
    width = len(header) if header is not None else spec.columns
    cols = [_column(spec, header, c, path) if c is not None else None for c in (spec.text, spec.text_pair, spec.label)]
    examples = []
    for number, row in enumerate(body, start=2 if spec.header else 1):
        where = f"{path}:{number}"
        if width is not None and len(row) != width:
            raise DataError(f"{where}: {len(row)} columns where the header has {width}; the row is ragged or cut")
        text_i, pair_i, label_i = cols
        examples.append(
            Example(row[text_i], row[pair_i] if pair_i is not None else None, _label(spec, row[label_i], where))
        )
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


def load_glue(task: str, data_dir: str | os.PathLike | None = None) -> dict[str, list[Example]]:
    """Splits of a GLUE task: ``train`` plus ``validation`` (MNLI: ``validation_matched``/``_mismatched``).

    From ``data_dir``, else $DYNLORA_GLUE_DIR; with neither, from the hub through the optional `datasets` package
    (``pip install 'dynlora[hub]'``); every failure is a DataError saying where data was looked for."""
    spec = task_spec(task)
    root = resolve_glue_dir(data_dir)
    if root is None:
        return from_hub(spec, _hub_dataset(spec))
    folder = root / spec.folder
    if not folder.is_dir():
        raise DataError(
            f"no {spec.folder}/ folder in {root}; point --data-dir (or ${ENV_GLUE_DIR}) at the folder holding GLUE "
            "task folders (CoLA/, SST-2/, ...)"
        )
    splits = {"train": read_tsv(spec, folder / "train.tsv")}
    for split, filename in spec.dev_files:
        splits[split] = read_tsv(spec, folder / filename)
    return splits


# Columns of the hub's "nyu-mll/glue" builder: (text, text pair); its labels are ids in the order of TASKS.
HUB_COLUMNS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def _hub_dataset(spec: TaskSpec):
    looked = f"--data-dir, ${ENV_GLUE_DIR}"
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"no GLUE data given ({looked}); pass --data-dir DIR with GLUE's TSV folders, or install the hub "
            "fallback: pip install 'dynlora[hub]'"
        ) from None
    try:
        return datasets.load_dataset("nyu-mll/glue", spec.name)
    except Exception as e:  # offline, hub down, ...: say where we looked, not a hub stack trace
        raise DataError(
            f"no GLUE data given ({looked}) and the datasets hub failed ({type(e).__name__}); "
            "pass --data-dir DIR with GLUE's TSV folders"
        ) from e


def from_hub(spec: TaskSpec, dataset) -> dict[str, list[Example]]:
    """Examples of a hub GLUE dataset (a mapping of split name to rows, each a dict of the builder's columns)."""
    text_key, pair_key = HUB_COLUMNS[spec.name]
    splits = {}
    for split in ["train"] + [name for name, _ in spec.dev_files]:
        rows = dataset[split]
        splits[split] = [
            Example(
                r[text_key],
                r[pair_key] if pair_key else None,
                float(r["label"]) if spec.is_regression else int(r["label"]),
            )
            for r in rows
        ]
    return splits
