"""Several processes: the frozen base sharded with FSDP2, the trainable parameters replicated and averaged.

Dynamic LoRA's engine changes adapters in ways an optimizer step does not: it re-bases a layer (A' = T A,
B' = B T⁻¹), drops and starts components, and moves their optimizer state along. Those are whole-matrix operations
on tensors that are small (the adapters are ~0.1-1 % of a model), so here the adapters stay whole on every
process and only what is large and frozen is sharded:

- :func:`shard_frozen` applies ``torch.distributed.fsdp.fully_shard`` (FSDP2) to every transformer block and to
  the root, with the trainable parameters (adapters, task head) left out of the sharding (``ignored_params``).
  FSDP2 then gathers each block's frozen weights just before it computes and frees them after, so the base model
  takes ~1/world of its memory on each process, and no parameter the engine touches is a DTensor.
- :func:`average_gradients` averages the trainable parameters' gradients over the processes after the backward
  pass, in one all-reduce (DDP's job, which FSDP2 does not do for ignored parameters). Every process then holds
  the same gradients, takes the same optimizer step and makes the same re-allocation decision, exactly as one
  process on the whole batch would. A parameter that got no gradient on a process counts as a zero gradient
  there (as DDP's ``find_unused_parameters`` does), so no process waits for a gradient that never comes.

Memory: each process holds the adapters, their gradients and AdamW state in full (~4 × 4 bytes per adapter
parameter): ~80 MB for rank 8 on every linear layer of a 1B model, against the base's 1/world share.
"""

from __future__ import annotations

import os

import torch
from torch import nn


def in_process_group() -> bool:
    """Whether this process is one of a torch.distributed group: the engine's collectives (synced scores,
    gradients and input statistics) run only then."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def launched_distributed() -> bool:
    """Whether this process is, or will be, one of several: in a process group already, or started by a launcher
    that says so (torchrun, ``accelerate launch``: ``WORLD_SIZE`` > 1) before any group exists."""
    return in_process_group() or int(os.environ.get("WORLD_SIZE", "1")) > 1


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, as transformers names them (``_no_split_modules``: LlamaDecoderLayer,
    BertLayer, ...), else the members of its longest ``nn.ModuleList``."""
    block_names: set[str] = set()
    for module in model.modules():
        block_names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_frozen(model: nn.Module, mesh=None) -> nn.Module:
    """Shard ``model``'s frozen parameters over the processes with FSDP2, block by block; trainable ones stay
    whole on every process (module doc). Call it once the adapters are in place, before building the optimizer;
    average the gradients with :func:`average_gradients` after each backward pass."""
    from torch.distributed.fsdp import fully_shard

    trainable = {p for p in model.parameters() if p.requires_grad}
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=trainable & set(block.parameters()))
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    return model


@torch.no_grad()
def average_gradients(params: list[nn.Parameter], group=None) -> None:
    """Average the gradients of ``params`` over the processes of ``group`` in one all-reduce, reading nothing back
    to the host (module doc). Every process must call it with the same parameters in the same order."""
    world = torch.distributed.get_world_size(group)
    if not params or world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    torch.distributed.all_reduce(flat, group=group)  # a sum: gloo has no average
    flat /= world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
