"""Where a run computes (``--device``) and in which precision (``--precision``).

- ``auto`` picks CUDA, else Apple's MPS, else the CPU; under ``torchrun`` each process takes the GPU of its
  ``LOCAL_RANK``, and the process group uses NCCL only when the tensors are on CUDA (gloo otherwise).
- ``bf16`` / ``fp16`` run the forward and backward under autocast; the adapters, the task head and the optimizer
  state stay float32 (as the model was loaded), and the engine's linear algebra is float32 or float64 whatever the
  precision. ``fp16`` scales the loss (torch.amp.GradScaler): a step whose scaled gradients overflow is retried
  with a smaller scale on the next batch, as every fp16 trainer does, and is not counted as a non-finite step.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch


def resolve_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this machine has no CUDA device for torch; use --device auto or cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "mps" and not has_mps:
        raise ValueError("--device mps: this machine has no MPS device for torch; use --device auto or cpu")
    return torch.device(name)


MAX_RETRIES = 24  # halvings of fp16's loss scale: from its start, 2^16, down to 2^-8


class Precision:
    """Autocast and, for fp16, loss scaling, on ``device``."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        self.retries = 0  # overflow retries since the last step taken

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size (before clipping and the finiteness check)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.retries = 0
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def retry_after_overflow(self, loss: float) -> bool:
        """After a step with non-finite gradients: whether it was fp16's scaled gradients overflowing with a finite
        loss (then the scale is lowered and the step retried, not counted as non-finite). At most MAX_RETRIES in a
        row: a gradient that is non-finite at every scale is the model's, and counts as a non-finite step."""
        if self.scaler is None or not math.isfinite(loss) or self.retries >= MAX_RETRIES:
            self.retries = 0
            return False
        self.retries += 1
        self.scaler.update()
        return True

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
