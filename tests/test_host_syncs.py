"""The per-step path stays on the device: between two re-allocations a training step (forward, backward, the
engine's update) reads nothing back to the host and makes no tensor off the model's device.

On this CPU there is no device to stall, so the test records what would: every call that copies a tensor's value to
the host (``item``, ``tolist``, ``bool``, ``float``, ``cpu``, ``numpy``, boolean-mask indexing), every tensor
factory called without a device, and every ``torch.tensor`` of host data (on CUDA a blocking copy to the device),
through a TorchFunctionMode over the steps."""

import traceback
from pathlib import Path

import torch
from conftest import build
from test_engine import data
from torch.overrides import TorchFunctionMode

from dynlora import DynamicLoRAConfig, get_dynlora_model
from dynlora.diagnostics import HOST_READS

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.randn, torch.rand}


def caller() -> str | None:
    """file:line of the innermost frame outside torch, when it is dynlora's (transformers' own masking code has a
    host read of its own: not ours to remove)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno}" if "/dynlora/" in frame.filename else None
    return None


class Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.off_device: list[str] = []
        self.uploads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        where = caller()
        if where is None:
            return func(*args, **kwargs)
        if func in HOST_READS:
            self.reads.append(f"{getattr(func, '__name__', func)} at {where}")
        if func is torch.Tensor.__getitem__ and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool
            for a in (args[1] if isinstance(args[1], tuple) else (args[1],))
        ):
            self.reads.append(f"boolean-mask indexing at {where}")
        if func is torch.Tensor.to and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values())):
            self.reads.append(f"to('cpu') at {where}")
        if func in FACTORIES and "device" not in kwargs:
            self.off_device.append(f"{getattr(func, '__name__', func)} at {where}")
        if func is torch.tensor:
            self.uploads.append(f"torch.tensor at {where}")
        return func(*args, **kwargs)


def test_a_step_between_reallocations_neither_reads_back_nor_leaves_the_device():
    config = DynamicLoRAConfig(rank=4, warmup=4, interval=10, final=14)  # re-allocations at 4 and 14 only
    model = get_dynlora_model(build("bert"), config)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.bind_optimizer(optimizer, total_steps=20)
    for step in range(1, 6):  # the first step starts components, the fourth re-allocates: both may read back
        model(**data(step)).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    batches = [data(step) for step in range(6, 10)]
    with Recorder() as recorder:
        for step, batch in zip(range(6, 10), batches, strict=True):
            model(**batch).loss.backward()
            optimizer.step()
            model.update_and_allocate(step)
            optimizer.zero_grad()
    assert recorder.reads == []
    assert recorder.off_device == []
    assert recorder.uploads == []
