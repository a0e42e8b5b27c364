"""The PEFT baselines, PEFT's own implementations at dynlora's budget, read from the same DynamicLoRAConfig:

- ``peft-lora``: LoRA at ``rank`` (the baseline users have today);
- ``peft-adalora``: AdaLoRA from ``1.5 × rank`` down to ``rank`` (its final budget equals the others'), on the
  run's schedule (``warmup``, ``interval``, ``final``: :func:`adalora_schedule`);
- ``peft-rslora``: LoRA with rsLoRA's scale alpha / sqrt(r) (``use_rslora``);
- ``peft-loraplus``: LoRA trained with LoRA+'s optimizer, B at 16 × the learning rate of A and of the task head
  (adapted.py's ``adamw``);
- ``peft-eva``: LoRA started by EVA: A from the top right-singular vectors of each layer's inputs on the first
  training batches, ranks redistributed by explained variance within ``rank ×`` the number of layers (``rho`` 2).
  Its budget is counted in ranks: on layers of equal size the parameters equal LoRA's, on mixed sizes (all linear
  layers) they may differ, and the run's parameter count says by how much.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DynamicLoRAConfig, tagged
from ..targets import default_modules_to_save, default_target_modules
from .protocols import SampleBatches, adamw, load_trained, trainable_count
from .settings import METHODS

LORAPLUS_RATIO = 16  # LoRA+'s lr_B / lr_A, as PEFT's documentation uses
EVA_BATCHES = 32  # training batches EVA may look at (it stops earlier once each layer's directions settle)

PEFT_SETTINGS = tagged(DynamicLoRAConfig, "every_method")  # what PEFT's methods read of the adapter settings
SCHEDULE_SETTINGS = tagged(DynamicLoRAConfig, "schedule")  # what AdaLoRA reads besides


def adalora_schedule(config: DynamicLoRAConfig, total_steps: int) -> dict[str, int]:
    """AdaLoRA's ``tinit``, ``tfinal`` and ``deltaT`` from the run's schedule: it starts pruning after ``warmup``,
    every ``interval``, and fixes its budget for the steps after ``final``. A fraction of the run is rounded down,
    as PEFT's own examples do (``int(0.1 * total_step)``); a step count is taken as it is."""

    def steps(value: float | int) -> int:
        return value if isinstance(value, int) else int(value * total_steps)

    # The steps after `final`; as a fraction, its complement rounded to undo float noise (1 - 0.8 = 0.19999...).
    after_final = total_steps - config.final if isinstance(config.final, int) else steps(round(1.0 - config.final, 12))
    return {"tinit": steps(config.warmup), "tfinal": after_final, "deltaT": max(1, steps(config.interval))}


class PeftAdapted:
    def __init__(self, model: nn.Module, variant: str) -> None:
        self.model = model
        self.variant = variant
        self.adalora = variant == "adalora"
        self.allocator = getattr(model.base_model, "rankallocator", None)

    def bind(self, optimizer: torch.optim.Optimizer, total_steps: int) -> None:
        pass  # AdaLoRA's schedule was fixed when it was built

    def after_step(self, step: int) -> list[dict[str, Any]]:
        if self.adalora:
            self.model.base_model.update_and_allocate(step)
        return []  # AdaLoRA's masks move inside PEFT: its ranks are logged with each loss record

    def skip_step(self) -> None:
        pass

    def ranks(self) -> dict[str, int]:
        if not self.adalora:
            return {}
        # AdaLoRA masks ranks by zeroing entries of lora_E; the active rank is the count of non-zero entries.
        return {
            n.removesuffix(".lora_E.default"): int((p != 0).sum())
            for n, p in self.model.named_parameters()
            if n.endswith("lora_E.default")
        }

    def allocation_events(self) -> list[dict[str, Any]]:
        return []

    def training_tensors(self) -> dict[str, torch.Tensor]:
        trained = {name for name, p in self.model.named_parameters() if p.requires_grad}
        return {name: t for name, t in self.model.state_dict().items() if name in trained}

    def load_training_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        load_trained(self.model, tensors, self.training_tensors())

    def trainable_parameters(self) -> int:
        return trainable_count(self.model)

    def save(self, directory: str | Path) -> None:
        with warnings.catch_warnings():
            # AdaLoRA may prune a layer to rank 0, which it saves as 0-sized tensors; PEFT then warns that ZeRO-3 /
            # FSDP shards were not gathered, which cannot be the case here.
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
            self.model.save_pretrained(str(directory))

    def state_dict(self) -> dict[str, Any]:
        if self.allocator is None:
            return {}
        return {k: dict(getattr(self.allocator, k)) for k in ("ipt", "exp_avg_ipt", "exp_avg_unc")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self.allocator, key, dict(value))
        # AdaLoRA keeps the mask it last applied only in its config, which a restart loses (and after its final
        # step it masks with that: a resumed run would fail). The mask is exactly the zeroed entries of the
        # restored lora_E, so rebuild it from them, the way PEFT names it.
        params = self.model.base_model.model.named_parameters()
        masks = {n: (p != 0).view(-1).tolist() for n, p in params if "lora_E." in n}
        if not all(all(m) for m in masks.values()):
            self.model.peft_config["default"].rank_pattern = masks

    def make_optimizer(
        self, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
    ) -> torch.optim.Optimizer:
        if loraplus_lr_ratio is None and self.variant == "loraplus":
            loraplus_lr_ratio = LORAPLUS_RATIO
        return adamw(self.model, lr, weight_decay, loraplus_lr_ratio)


@dataclass(frozen=True)
class Peft:
    name: str
    variant: str  # lora | adalora | rslora | loraplus | eva

    def identity(self, config: DynamicLoRAConfig) -> dict[str, Any]:
        read = PEFT_SETTINGS + (SCHEDULE_SETTINGS if self.variant == "adalora" else ())
        return {k: getattr(config, k) for k in read}

    def wrap(
        self, base: nn.Module, config: DynamicLoRAConfig, total_steps: int, batches: SampleBatches | None = None
    ) -> PeftAdapted:
        from peft import AdaLoraConfig, EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

        targets = config.target_modules if config.target_modules is not None else default_target_modules(base)
        default = default_modules_to_save(base, config.train_untrained_pooler)
        saved = default if config.modules_to_save is None else config.modules_to_save
        common = dict(
            target_modules=targets, lora_alpha=config.alpha, lora_dropout=config.dropout, modules_to_save=saved or None
        )
        if self.variant == "adalora":
            peft_config = AdaLoraConfig(
                init_r=max(config.rank + 1, round(1.5 * config.rank)),
                target_r=config.rank,
                total_step=total_steps,
                **adalora_schedule(config, total_steps),
                **common,
            )
        elif self.variant == "eva":
            if batches is None:
                raise ValueError("peft-eva starts from the training data: give the run's first batches")
            # Sequence classification: every non-padding token's input counts (no token-level label mask).
            eva = EvaConfig(rho=2.0, use_label_mask=False)
            peft_config = LoraConfig(r=config.rank, init_lora_weights="eva", eva_config=eva, **common)
        else:
            peft_config = LoraConfig(r=config.rank, use_rslora=self.variant == "rslora", **common)
        with warnings.catch_warnings():  # PEFT's memory advice for EVA on large models does not apply here
            warnings.filterwarnings("ignore", message=".*low_cpu_mem_usage.*")
            model = get_peft_model(base, peft_config)
        if self.variant == "eva":
            initialize_lora_eva_weights(
                model, dataloader=list(itertools.islice(batches(), EVA_BATCHES)), show_progress_bar=False
            )
        return PeftAdapted(model, self.variant)


PEFT_METHODS = tuple(Peft(name, name.removeprefix("peft-")) for name in METHODS if name.startswith("peft-"))
