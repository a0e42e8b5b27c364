"""Hugging Face Trainer integration: add ``DynamicLoRACallback()`` to ``callbacks=[...]`` and call nothing else."""

from __future__ import annotations

import os
import warnings

import torch
from transformers import TrainerCallback

from .io import atomic_write
from .model import DynamicLoRAModel

ENGINE_STATE_NAME = "dynlora_engine.pt"  # in each Trainer checkpoint: the engine's state
OLD_ENGINE_STATE_NAME = "dynlora_allocator.pt"  # the same file, as earlier checkpoints name it


def _unwrap(model) -> DynamicLoRAModel:
    """The DynamicLoRAModel inside whatever the Trainer hands us (DDP/accelerate wrappers have ``.module``)."""
    while not isinstance(model, DynamicLoRAModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, DynamicLoRAModel):
        raise TypeError(
            f"DynamicLoRACallback needs the Trainer's model to be a DynamicLoRAModel, got {type(model).__name__}; "
            "wrap it first with dynlora.get_dynlora_model(model, config)"
        )
    return model


class DynamicLoRACallback(TrainerCallback):
    """Drives Dynamic LoRA under ``transformers.Trainer``.

    - binds the Trainer's optimizer and its ``max_steps`` at the start of training (no ``total_step`` by hand);
    - after every optimizer step (before gradients are zeroed) updates importance and re-allocates on schedule;
    - saves the engine's state into each Trainer checkpoint (``dynlora_engine.pt``) and restores it on
      ``resume_from_checkpoint``;
    - warns loudly at the end if the schedule promised re-allocations and none happened (PEFT #1327).
    """

    def __init__(self) -> None:
        self.reallocations = 0
        self._resume_checked = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _unwrap(model).bind_optimizer(optimizer, state.max_steps)
        self.reallocations = 0
        self._resume_checked = False

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # Trainer restores a checkpoint's TrainerState only after on_train_begin, and tells callbacks nothing of
        # the path: a resumed run shows itself here by a non-zero global_step, its checkpoint by that step.
        if self._resume_checked:
            return
        self._resume_checked = True
        dyn = _unwrap(model)
        if state.global_step == 0 or not dyn.reallocates:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(checkpoint, ENGINE_STATE_NAME)
        if not os.path.isfile(path) and os.path.isfile(os.path.join(checkpoint, OLD_ENGINE_STATE_NAME)):
            path = os.path.join(checkpoint, OLD_ENGINE_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step} but {path} is missing: the rank allocation cannot be "
                "restored. Resume from a checkpoint under output_dir written with DynamicLoRACallback."
            )
        # Trainer restored the state dict (the factors as stored); put each layer back at its saved rank.
        dyn.load_engine_state_dict(torch.load(path, weights_only=True), restore_ranks=True)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Trainer increments global_step after this event: this is optimizer step global_step + 1.
        if _unwrap(model).update_and_allocate(state.global_step + 1):
            self.reallocations += 1

    def on_save(self, args, state, control, model=None, **kwargs):
        dyn = _unwrap(model)
        if not dyn.reallocates or not state.is_world_process_zero:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", ENGINE_STATE_NAME)
        atomic_write(path, lambda tmp: torch.save(dyn.engine_state_dict(), tmp))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        dyn = _unwrap(model)
        if dyn.reallocation_due_by(state.global_step) and not dyn.allocation_events():
            warnings.warn(
                "Dynamic LoRA never re-allocated ranks during this run although its schedule says it should have; "
                "the adapter trained as a static LoRA",
                stacklevel=2,
            )
