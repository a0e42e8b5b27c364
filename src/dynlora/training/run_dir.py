"""A run's output directory: whether it is ours to write, who is using it, and what a run that fails early leaves.

A directory becomes a run's when the run claims it: it must not exist, be empty, or already be a dynlora run
(``.dynlora-run`` in it, or checkpoints of an older dynlora); a file, or a directory of someone else's files, is
refused before anything is loaded or written. The claim is an exclusive lock on ``.dynlora-run`` held until the run
ends, so a second run on the same directory is refused at once instead of interleaving its files with the first's.
A run that fails before its first checkpoint removes the directory it created: nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the other checks still hold
    fcntl = None

MARKER = ".dynlora-run"


def is_run_directory(path: Path) -> bool:
    return (path / MARKER).is_file() or (path / "checkpoints" / "LATEST").is_file()


def in_use(path: Path) -> bool:
    """Whether a run holds ``path`` now (its lock is taken)."""
    marker = Path(path) / MARKER
    if fcntl is None or not marker.is_file():
        return False
    with open(marker) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


class RunDirectory:
    """Claim ``path`` for a run (see the module doc); :meth:`release` when the run ends."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.created = self.was_empty = self.made_marker = False
        self._lock = None

    def claim(self, resume: bool = False) -> None:
        """Make the directory this run's; ``resume``: it must hold a run's checkpoint (else it must not)."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise ValueError(f"--output-dir {path} is a file; give a directory (new, empty, or an earlier run's)")
        if path.is_dir() and any(path.iterdir()) and not is_run_directory(path):
            found = ", ".join(sorted(p.name for p in path.iterdir())[:4])
            raise ValueError(
                f"--output-dir {path} holds files that are not a dynlora run ({found}, ...); "
                "choose a new or empty directory"
            )
        self.created = not path.exists()
        self.was_empty = self.created or not any(path.iterdir())
        self.made_marker = not (path / MARKER).exists()
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / MARKER, "a+")  # noqa: SIM115 - held open for the run's lifetime: it is the lock
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "unknown"
                lock.close()
                raise ValueError(
                    f"--output-dir {path} is in use by another dynlora run (process {holder}); wait for it to end "
                    "or choose another directory"
                ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock
        has_checkpoint = (path / "checkpoints" / "LATEST").is_file()
        if resume != has_checkpoint:
            self.release(failed=True, before_a_checkpoint=True)
            if resume:
                raise CheckpointError(f"no checkpoint to resume from in {path}; drop --resume to start a new run")
            raise ValueError(f"{path} already holds a run's checkpoints; pass --resume, or a new --output-dir")

    def release(self, failed: bool = False, before_a_checkpoint: bool = False) -> None:
        """Give the directory up. After a failure, take back what the claim added: the marker, and when the run
        failed before writing any checkpoint, the directory (if it made it) or everything in it (if it was empty)."""
        if self._lock is None:
            return
        with contextlib.suppress(OSError):
            self._lock.seek(0)
            self._lock.truncate()
        self._lock.close()  # closing the file releases the lock
        self._lock = None
        if not failed:
            return
        if before_a_checkpoint and self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        elif before_a_checkpoint and self.was_empty:  # the user's empty directory: empty again
            for child in self.path.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        elif self.made_marker:
            (self.path / MARKER).unlink(missing_ok=True)
