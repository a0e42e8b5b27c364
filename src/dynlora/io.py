"""Atomic writes: a reader sees the old file or the new one, never half of one; new directories appear whole."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _as_created(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temporary file or directory (created 0600 / 0700) the mode of one created normally: the user's umask
    decides who else may read it, as with every other tool."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def as_created_tree(root: str | os.PathLike) -> None:
    """:func:`_as_created` for ``root`` and everything in it: files that other libraries wrote 0600 (safetensors
    does) become readable as the umask allows."""
    root = Path(root)
    _as_created(root, directory=root.is_dir())
    for path in root.rglob("*"):
        _as_created(path, directory=path.is_dir())


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _as_created(tmp)  # after write: some writers (safetensors) replace the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    """One JSON object per line, written atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)

    atomic_write(path, write)


@contextlib.contextmanager
def new_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; when the block ends without error, rename it to ``path``.

    A directory that exists and is not empty is refused (it may be something the user needs), so an output is
    either absent, or complete — never half-written, never mixed into other files."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"{path} already exists and is not empty; choose a new output directory or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        as_created_tree(tmp)
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` on a fresh directory beside ``path``, then put it in place of ``path``: a reader
    sees the old directory or the new one, whole."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    as_created_tree(tmp)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
