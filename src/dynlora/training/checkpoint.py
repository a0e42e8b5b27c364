"""Training checkpoints: written whole into a temporary directory, checksummed, renamed into place, and only then
pointed to by ``LATEST``; so a kill at any moment (even mid-write) leaves the previous checkpoint intact and
loadable, and a damaged file is detected on load instead of resuming from garbage.

Each manifest carries a ``format_version``. A checkpoint of an older format is brought up to the current one by
the explicit steps in migrations.py before the run's identity is compared, so a checkpoint resumes exactly when it
was written with the settings the run has now."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io import as_created_tree, atomic_write
from .errors import CheckpointError
from .migrations import CHECKPOINT_VERSION, migrate
from .protocols import AdaptedModel

LATEST = "LATEST"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
STATE = "state.pt"


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


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    tensors: dict[str, torch.Tensor],
    state: dict,
    identity: dict[str, Any],
    data: dict[str, str] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` and make it the latest; older ones are removed after. ``data``: the
    SHA-256 of each file the run trains on, checked when it resumes."""
    root = Path(root)
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    for stale in root.glob(".step-*.tmp"):  # left by a writer that was killed mid-way
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        as_created_tree(tmp)
        files = {f: _sha256(tmp / f) for f in (WEIGHTS, STATE)}
        (tmp / MANIFEST).write_text(
            json.dumps(
                {"format_version": CHECKPOINT_VERSION, "step": step, "identity": identity, "sha256": files}
                | ({"data": data} if data else {}),
                indent=2,
            )
        )
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


def _differences(theirs: Any, ours: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(setting, theirs, ours) for every setting that differs; nested settings as ``adapter.rank``."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        return [
            d
            for k in sorted(theirs.keys() | ours.keys(), key=str)
            for d in _differences(theirs.get(k), ours.get(k), f"{prefix}{k}.")
        ]
    return [] if theirs == ours else [(prefix[:-1], theirs, ours)]


def load_checkpoint(
    root: str | os.PathLike,
    identity: dict[str, Any],
    data: dict[str, str] | None = None,
    ignored: frozenset[str] = frozenset(),
) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(tensors, state, step) of the latest checkpoint under ``root``, verified against its checksums, brought to
    the current format, and checked against the ``identity`` of the run that wants to resume from it and against
    the contents of its training files (``data``, as :func:`save_checkpoint` took it; checkpoints written before
    it was recorded are not checked). Settings named in ``ignored`` may differ (a run's length, when extended)."""
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
    state = torch.load(path / STATE, weights_only=True)
    manifest, state = migrate(manifest, state, where=str(path))
    different = [d for d in _differences(manifest["identity"], identity) if d[0] not in ignored]
    if different:
        key, theirs, ours = different[0]
        raise CheckpointError(
            f"checkpoint {path} is from another run: {key} was {theirs!r}, now {ours!r}; "
            "resume with the same settings or use a new --output-dir"
        )
    for file, digest in (data or {}).items():
        if manifest.get("data", {}).get(file, digest) != digest:
            raise CheckpointError(
                f"{file} has changed since checkpoint {path} was written: a resumed run would train on other data; "
                "put the file back as it was, or start a new --output-dir"
            )
    return load_file(str(path / WEIGHTS)), state, int(manifest["step"])


def data_digests(*files: str | None) -> dict[str, str]:
    """The SHA-256 of each training file given, by its path: what :func:`load_checkpoint` checks on resume."""
    return {file: _sha256(Path(file)) for file in files if file and Path(file).is_file()}


def run_state(optimizer, scheduler, method_state: dict, counters: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the tensors that makes a resumed run continue exactly (restored by
    :func:`restore_run_state`)."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "method": method_state,
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
        **{k: json.dumps(v) if k == "best" else v for k, v in counters.items()},
    }


def restore_run_state(state: dict[str, Any], optimizer, scheduler) -> dict[str, Any]:
    """Restore what :func:`run_state` saved into the optimizer, scheduler and RNGs; return the counters."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    counters = {"best": json.loads(state["best"])}
    return {**counters, **{k: int(state[k]) for k in ("micro", "skipped", "peak")}}


class RunCheckpoints:
    """The checkpoints of one run under ``root``: written at optimizer-step boundaries by the first process
    (``writer``) and read back exactly, for a run of the given ``identity`` (its settings) on the training files
    whose contents ``data`` holds (:func:`data_digests`)."""

    def __init__(self, root: Path, identity: dict[str, Any], data: dict[str, str], writer: bool) -> None:
        self.root, self.identity, self.data, self.writer = root, identity, data, writer

    def save(self, step: int, adapted: AdaptedModel, optimizer, scheduler, counters: dict[str, Any]) -> None:
        """Checkpoint ``adapted`` with its optimizer, schedule and counters."""
        if self.writer:
            state = run_state(optimizer, scheduler, adapted.state_dict(), counters)
            save_checkpoint(self.root, step, adapted.training_tensors(), state, self.identity, self.data)

    def restore(
        self, adapted: AdaptedModel, optimizer, scheduler, ignored: frozenset[str] = frozenset()
    ) -> tuple[int, dict[str, Any]]:
        """Load the latest checkpoint into ``adapted``, ``optimizer`` and ``scheduler``; its step and counters.
        Settings named in ``ignored`` may differ from the checkpoint's."""
        tensors, state, step = load_checkpoint(self.root, self.identity, self.data, ignored)
        adapted.load_training_tensors(tensors)
        counters = restore_run_state(state, optimizer, scheduler)
        adapted.load_state_dict(state["method"])
        return step, counters
