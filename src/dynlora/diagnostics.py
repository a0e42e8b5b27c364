"""Counting the reads of tensor values back to the host: each one waits for the device to finish, which stalls a
GPU's queue. A training step that reads nothing between two re-allocations keeps the device busy."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

# Calls that copy a tensor's value to the host (boolean-mask indexing, which does too, is recognised by its
# argument: see tests/test_host_syncs.py).
HOST_READS = frozenset(
    {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.__index__,
    }
)


class HostReads(TorchFunctionMode):
    """``with HostReads() as reads: ...`` counts the host reads of everything run inside (``reads.count``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in HOST_READS
        return func(*args, **(kwargs or {}))
