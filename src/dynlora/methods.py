"""The adapter methods a training run can use, at an equal trainable adapter budget, behind one small interface.

- ``dynamic``: Dynamic LoRA (re-allocation, input adaptation, components started along the loss gradient),
  budget of LoRA at ``rank``; ``reallocate: false`` keeps the rest with a static allocation (an ablation).
- ``lora``: our static LoRA at ``rank`` (no re-allocation, no input adaptation, random A: plain LoRA).
- ``peft-lora``: PEFT's LoRA at ``rank`` (the baseline users have today).
- ``peft-adalora``: PEFT's AdaLoRA from ``1.5 × rank`` down to ``rank`` (its final budget equals the others').
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import DynamicLoRAConfig
from .model import DynamicLoRAModel, get_dynlora_model
from .targets import default_modules_to_save, default_target_modules

METHODS = ("dynamic", "lora", "peft-lora", "peft-adalora")


@dataclass
class AdapterSettings:
    """The knobs every method shares, plus Dynamic LoRA's own."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    max_rank: int | None = None
    min_rank: int = 1
    importance: str = "sensitivity"
    temperature: float = 1.0
    max_rank_change: int | None = None
    warmup: float | int = 0.1
    interval: float | int = 0.05
    final: float | int = 0.8
    input_adaptive: str | None = "mergeable"
    input_norm_strength: float = 1.0
    init: str = "gradient"
    reallocate: bool = True
    seed: int = 0


@dataclass
class Adapted:
    """A model wrapped by one method, and what the training loop needs to drive and save it."""

    method: str
    model: nn.Module
    bind: Callable[[torch.optim.Optimizer, int], None]
    after_optimizer_step: Callable[[int], object]
    save_adapter: Callable[[Path], None]
    state_dict: Callable[[], dict]
    load_state_dict: Callable[[dict], None]
    ranks: Callable[[], dict[str, int]]
    skip_step: Callable[[], None] = lambda: None

    def trainable_parameters(self) -> int:
        if isinstance(self.model, DynamicLoRAModel):
            return self.model.trainable_parameters()
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def settings_before(method: str) -> dict:
    """What adapter settings added since checkpoints were first written did before they existed, under ``method``:
    an older checkpoint resumes only when they are at these values now."""
    return {"init": "lora", "reallocate": method == "dynamic", "input_norm_strength": 1.0}


def adapter_identity(method: str, adapter: dict) -> dict:
    """Adapter settings as ``method`` runs them, for checkpoint identity: the settings :func:`settings_before`
    names act in Dynamic LoRA only, so any other method records what it does — what it did before they existed
    (random A, static ranks, no input scaling) — not the default."""
    return adapter if method == "dynamic" else {**adapter, **settings_before(method)}


def _dynlora(base: nn.Module, s: AdapterSettings, dynamic: bool) -> Adapted:
    config = DynamicLoRAConfig(
        target_modules=s.target_modules, rank=s.rank, alpha=s.alpha, dropout=s.dropout,
        max_rank=s.max_rank if dynamic else None, reallocate=dynamic and s.reallocate, importance=s.importance,
        min_rank=s.min_rank, temperature=s.temperature, max_rank_change=s.max_rank_change, warmup=s.warmup,
        interval=s.interval, final=s.final,
        input_adaptive=s.input_adaptive if dynamic else None, input_norm_strength=s.input_norm_strength,
        init=s.init if dynamic else "lora", seed=s.seed,
    )  # fmt: skip
    model = get_dynlora_model(base, config)

    def state_dict() -> dict:
        return {"allocator": model.allocator.state_dict()} if model.allocator is not None else {}

    def load_state_dict(state: dict) -> None:
        if model.allocator is not None:
            # The checkpoint restored every parameter at full capacity; set the ranks the allocator recorded.
            model.allocator.load_state_dict(state["allocator"], restore_ranks=True)

    return Adapted(
        "dynamic" if dynamic else "lora", model, model.bind_optimizer, model.update_and_allocate,
        model.save_pretrained, state_dict, load_state_dict, model.rank_pattern, model.skip_step,
    )  # fmt: skip


def _peft(base: nn.Module, s: AdapterSettings, adalora: bool, total_steps: int) -> Adapted:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    targets = s.target_modules if s.target_modules is not None else default_target_modules(base)
    common = dict(target_modules=targets, lora_alpha=s.alpha, lora_dropout=s.dropout,
                  modules_to_save=default_modules_to_save(base) or None)  # fmt: skip
    if adalora:
        # AdaLoRA's own schedule, in the same fractions as ours: warm up 10 %, fix the budget for the last 20 %.
        config = AdaLoraConfig(
            init_r=max(s.rank + 1, round(1.5 * s.rank)),
            target_r=s.rank,
            total_step=total_steps,
            tinit=int(0.1 * total_steps),
            tfinal=int(0.2 * total_steps),
            deltaT=max(1, int(0.05 * total_steps)),
            **common,
        )
    else:
        config = LoraConfig(r=s.rank, **common)
    model = get_peft_model(base, config)
    allocator = getattr(model.base_model, "rankallocator", None)

    def after_step(step: int) -> None:
        if adalora:
            model.base_model.update_and_allocate(step)

    def state_dict() -> dict:
        if allocator is None:
            return {}
        return {k: dict(getattr(allocator, k)) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}

    def load_state_dict(state: dict) -> None:
        for key, value in state.items():
            setattr(allocator, key, dict(value))
        # AdaLoRA keeps the mask it last applied only in its config, which a restart loses (and after its final
        # step it masks with that, so a resumed run crashed). The mask is exactly the zeroed entries of the
        # restored lora_E, so rebuild it from them, the way PEFT names it.
        masks = {n: (p != 0).view(-1).tolist() for n, p in model.base_model.model.named_parameters() if "lora_E." in n}
        if not all(all(m) for m in masks.values()):
            model.peft_config["default"].rank_pattern = masks

    def ranks() -> dict[str, int]:
        if not adalora:
            return {}
        # AdaLoRA masks ranks by zeroing entries of lora_E; the active rank is the count of non-zero entries.
        return {
            n.removesuffix(".lora_E.default"): int((p != 0).sum())
            for n, p in model.named_parameters()
            if n.endswith("lora_E.default")
        }

    def save(directory: Path | str) -> None:
        with warnings.catch_warnings():
            # AdaLoRA may prune a layer to rank 0, which it saves as 0-sized tensors; PEFT then warns that ZeRO-3 /
            # FSDP shards were not gathered, which cannot be the case here.
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            model.save_pretrained(str(directory))

    return Adapted(
        "peft-adalora" if adalora else "peft-lora", model, lambda _opt, _steps: None, after_step, save,
        state_dict, load_state_dict, ranks,
    )  # fmt: skip


def adapt(method: str, base: nn.Module, settings: AdapterSettings, total_steps: int) -> Adapted:
    """Wrap ``base`` with ``method``; ``total_steps`` (optimizer steps) sets AdaLoRA's schedule."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if method in ("dynamic", "lora"):
        return _dynlora(base, settings, dynamic=method == "dynamic")
    return _peft(base, settings, adalora=method == "peft-adalora", total_steps=total_steps)
