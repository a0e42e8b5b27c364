"""User data as CSV or JSONL with a column mapping, for classification or regression."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..errors import DataError
from .glue import Example, regression_target


def _records(path: Path) -> list[dict]:
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

    ``labels`` fixes the label set (pass the train file's to read a dev file); by default it is the sorted set of
    labels found. A missing column, a missing value, an unknown label or a non-numeric regression target is a
    DataError naming the row."""
    path = Path(path)
    records = _records(path)
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
        labels = tuple(sorted({str(r.get(label_col)) for r in records}))
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
                raise DataError(f"{where}: label {raw!r} is not one of the train labels {', '.join(labels)}")
            label = labels.index(str(raw))
        pair = str(record[text_pair_col]) if text_pair_col else None
        examples.append(Example(str(record[text_col]), pair, label))
    return examples, (None if regression else labels)
