"""What can stop a training run, as the ``dynlora`` command reports it: one line, no traceback."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A problem with the user's data, reported in one line that says how to fix it."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or from another run."""


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""

    def __init__(self, in_a_row: int, step: int, checkpoint_kept: bool) -> None:
        kept = "The last checkpoint was kept." if checkpoint_kept else "No checkpoint had been written."
        self.details = (in_a_row, step, checkpoint_kept)
        super().__init__(
            f"loss or gradients were not finite for {in_a_row} steps in a row (at step {step}); lower --lr or check "
            f"the data. {kept}"
        )

    def __reduce__(self):  # crosses process boundaries intact (dynlora compare --jobs)
        return Diverged, self.details


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, step: int, out: Path, processes: int = 1) -> None:
        command = f"dynlora train --output-dir {out} --resume"
        if processes > 1:
            command = f"torchrun --nproc_per_node {processes} -m dynlora.cli train --output-dir {out} --resume"
        super().__init__(f"interrupted at step {step}; checkpoint saved. Resume with: {command}")
        self.step, self.out, self.processes = step, out, processes

    def __reduce__(self):  # crosses process boundaries intact (dynlora compare --jobs)
        return Interrupted, (self.step, self.out, self.processes)


# OSError: a full disk or a denied permission is the environment, not a bug: one line (--debug shows more).
USER_ERRORS = (DataError, CheckpointError, OSError, ValueError, RuntimeError)
