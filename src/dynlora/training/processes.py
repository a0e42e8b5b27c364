"""The process a run lives in: stopping on signals at a step boundary, and torch.distributed under torchrun."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any

import torch


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(this process's index, number of processes); joins the process group that ``torchrun`` describes, with NCCL
    when the tensors are on CUDA and gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    index = torch.distributed.get_rank() if world > 1 else 0
    return index, world


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
