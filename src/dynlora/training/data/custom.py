"""User data as CSV or JSONL with a column mapping, for classification or regression."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import DataError
from .glue import Example, finite_number, regression_target


def read_records(path: Path) -> list[dict]:
    """The rows of a CSV, TSV or JSONL file as dicts; a DataError naming the file (and line) otherwise."""
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a .csv, .tsv or .jsonl file")
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            records = []
            with open(path, encoding="utf-8-sig") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{number}: not a JSON object per line ({e.msg})") from e
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{number}: each line must be a JSON object")
                    records.append(record)
            return records
        if path.suffix.lower() in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from e
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv or .jsonl")


def load_custom(
    path: str | os.PathLike,
    text_col: str,
    text_pair_col: str | None = None,
    label_col: str = "label",
    labels: tuple[str, ...] | None = None,
    regression: bool = False,
) -> tuple[list[Example], tuple[str, ...] | None]:
    """Examples of a CSV/TSV/JSONL file and the label names (in id order; None for regression).

    ``labels`` fixes the label set (pass the train file's to read a dev file); by default it is the set of labels
    found, in numeric order when they are all whole numbers (0, 1, ..., 10), else in string order. A missing column,
    a missing value, an unknown label, a single class, numbers that are not classes (without ``regression``) or a
    non-numeric regression target is a DataError naming the file and, where there is one, the row."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path} has no examples")
    wanted = [c for c in (text_col, text_pair_col, label_col) if c is not None]
    missing = [c for c in wanted if c not in records[0]]
    if missing:
        raise DataError(
            f"{path}: no column {missing[0]!r} (found: {', '.join(map(str, records[0]))}); "
            "set --text-col/--text-pair-col/--label-col"
        )
    if not regression and labels is None:
        labels = class_labels(path, [str(r.get(label_col)) for r in records])
    examples = []
    for number, record in enumerate(records, start=1):
        where = f"{path}: example {number}"
        values = [record.get(c) for c in wanted]
        if any(v is None or v == "" for v in values):
            raise DataError(f"{where}: a value of {', '.join(wanted)} is missing")
        raw = record[label_col]
        if regression:
            label: int | float = regression_target(raw, where)
        else:
            if str(raw) not in labels:
                shown = ", ".join(labels[:8]) + (f", ... ({len(labels)} in all)" if len(labels) > 8 else "")
                raise DataError(f"{where}: label {raw!r} is not one of the train labels {shown}")
            label = labels.index(str(raw))
        pair = str(record[text_pair_col]) if text_pair_col else None
        examples.append(Example(str(record[text_col]), pair, label))
    return examples, (None if regression else labels)


def class_labels(path: Path, found: list[str]) -> tuple[str, ...]:
    """The classes of a training file in id order (see :func:`load_custom`)."""
    classes = set(found)
    numbers = [finite_number(c) for c in classes]
    if all(n is not None for n in numbers) and not all(n.is_integer() for n in numbers):
        example = next(c for c, n in zip(classes, numbers, strict=True) if not n.is_integer())
        raise DataError(
            f"{path}: the labels are numbers (e.g. {example!r}), not classes; pass --regression to train a "
            "one-output regression head"
        )
    if len(classes) < 2:
        raise DataError(
            f"{path}: every example has the label {next(iter(classes))!r}; a classifier needs at least two classes"
        )
    if all(n is not None and n.is_integer() for n in numbers):
        return tuple(sorted(classes, key=float))
    return tuple(sorted(classes))
