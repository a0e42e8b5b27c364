"""Training checkpoints: written whole into a temporary directory, checksummed, renamed into place, and only then
pointed to by ``LATEST``; so a kill at any moment (even mid-write) leaves the previous checkpoint intact and
loadable, and a damaged file is detected on load instead of resuming from garbage."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_write

LATEST = "LATEST"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or from another run."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    identity: dict[str, Any]) -> Path:  # fmt: skip
    """Write checkpoint ``step`` under ``root`` and make it the latest; older ones are removed after."""
    root = Path(root)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    for stale in root.glob(".step-*.tmp"):  # left by a writer that was killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        files = {f: _sha256(tmp / f) for f in (WEIGHTS, STATE)}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "identity": identity, "sha256": files}, indent=2))
        for f in (WEIGHTS, STATE, MANIFEST):
            _fsync(tmp / f)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoint stays the latest
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {name} in {root} ({e.strerror or e}); the previous checkpoint is kept"
        ) from e
    final = root / name
    if final.exists():  # the same step saved again (e.g. interrupted right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    atomic_write(root / LATEST, lambda t: Path(t).write_text(name + "\n"))
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    pointer = Path(root) / LATEST
    return Path(root) / pointer.read_text().strip() if pointer.is_file() else None


def _same(theirs: Any, ours: Any, before: dict[str, Any]) -> bool:
    """Equal settings, where a setting added to the library after the checkpoint was written counts as equal when
    it is now at the value that does what the library did before it existed: ``before[name]``, else None (every
    optional setting's "off")."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return all(_same(theirs.get(k), ours.get(k), before) if k in theirs else ours[k] == before.get(k)
                   for k in theirs | ours)  # fmt: skip
    return theirs == ours


def load_checkpoint(root: str | os.PathLike, identity: dict[str, Any],
                    before: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict, int]:  # fmt: skip
    """(tensors, state, step) of the latest checkpoint under ``root``, verified against its checksums and against
    the ``identity`` of the run that wants to resume from it; ``before``: what settings newer than the checkpoint
    did before they existed (see :func:`_same`)."""
    path = latest_checkpoint(root)
    if path is None:
        raise CheckpointError(f"no checkpoint to resume from in {root} (no {LATEST} file); drop --resume to start")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: its {MANIFEST} cannot be read ({e})") from e
    for filename, digest in manifest["sha256"].items():
        if not (path / filename).is_file() or _sha256(path / filename) != digest:
            raise CheckpointError(f"checkpoint {path} is damaged: {filename} is missing or fails its checksum")
    theirs = manifest["identity"]
    before = before or {}
    different = sorted(k for k in set(theirs) | set(identity) if not _same(theirs.get(k), identity.get(k), before))
    if different:
        key = different[0]
        raise CheckpointError(
            f"checkpoint {path} is from another run: {key} was {theirs.get(key)!r}, now {identity.get(key)!r}; "
            "resume with the same settings or use a new --output-dir"
        )
    tensors = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, weights_only=True)
    return tensors, state, int(manifest["step"])
