"""A training run's settings, declared once: TrainSettings (the run) and DynamicLoRAConfig (the adapter).

The ``dynlora`` command's flags, the keys of a ``--config`` file and their types and help all come from these two
dataclasses' fields (:mod:`dynlora.training.fields`). Adding a setting is one field with its ``help`` plus its check.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PREDATING, DynamicLoRAConfig, setting, tagged, written_settings
from .data.glue import TASKS
from .fields import settings_of

# The choices of the settings below. This module imports neither torch nor transformers: the command line reads it
# to build its flags, and `dynlora --help` prints at once.
# methods.py; `full` trains every weight (no adapter): the ceiling, not an equal budget
METHODS = ("dynamic", "lora", "peft-lora", "peft-adalora", "peft-rslora", "peft-loraplus", "peft-eva", "full")
DEFAULT_METHODS = ("dynamic", "lora", "peft-lora", "peft-adalora")  # what dynlora compare runs when not told
OBJECTIVES = ("auto", "classify", "lm", "instruct")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("linear", "constant")
ADAPTER_LR, FULL_LR = 5e-4, 2e-5  # the lr when not given: an adapter's, and whole-model fine-tuning's usual rate
QUICK_STEPS = 300  # `dynlora train` with neither --epochs nor --max-steps: a few minutes on a laptop CPU


@dataclass
class TrainSettings:
    """Everything a training run depends on besides the adapter (``adapter``). ``max_steps`` > 0 overrides
    ``epochs``; with neither given a GLUE task trains the quick ``QUICK_STEPS`` (as ``dynlora train`` with no flags)
    and a ``train_file`` one epoch (a few hundred steps could be hundreds of epochs of a small file)."""

    task: str = setting("sst2", f"GLUE task: {', '.join(TASKS)}")
    model: str | None = setting(
        None,
        "local model directory, hub id, or a shipped model: minilm (the default to classify) | smollm2 (the default "
        "for lm and instruct)",
    )
    objective: str = setting(
        "auto",
        "what to train for: classify (a task head) | lm (prompt/completion or chat JSONL, or .txt: the loss on what "
        "the model should write) | instruct (a GLUE task posed to a chat model) | auto (lm for such a file, "
        "instruct for a GLUE task on a causal LM, else classify)",
        choices=OBJECTIVES,
    )
    method: str = setting(
        "dynamic",
        f"adapter method at an equal budget: {' | '.join(m for m in METHODS if m != 'full')}; or full (every "
        "weight trains, no adapter: the ceiling)",
        choices=METHODS,
    )
    data_dir: str | None = setting(None, "GLUE folder (default: $DYNLORA_GLUE_DIR, else ../shared/data/glue)")
    train_file: str | None = setting(None, "your own training data, .csv/.tsv/.jsonl (instead of --task)")
    dev_file: str | None = setting(None, "your own evaluation data, same format as --train-file")
    text_col: str = setting("text", "column of the text in --train-file/--dev-file")
    text_pair_col: str | None = setting(None, "column of the second text of a pair, if any")
    label_col: str = setting("label", "column of the label")
    regression: bool = setting(False, "the labels of --train-file are numbers (one-output regression head)")
    max_length: int | None = setting(
        None,
        "truncate inputs to this many tokens (batches pad to their longest; a text file's block size); default: 128 "
        "to classify, for a language model 1024 or its positions if fewer",
    )
    max_train_samples: int | None = setting(None, "train on a random subset of this size")
    max_eval_samples: int | None = setting(None, "evaluate on a random subset of this size", run_only=True)
    batch_size: int | None = setting(
        None, "examples per micro-batch (per process); default: 32 to classify, 8 for a language model"
    )
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    epochs: float | None = setting(
        None, "training epochs, when --max-steps is 0 or not given (default: 1)", length=True
    )
    max_steps: int | None = setting(
        None,
        f"optimizer steps; overrides --epochs (0: use --epochs; with neither given: {QUICK_STEPS} on a GLUE task, "
        "one epoch of --train-file)",
        length=True,
    )
    lr: float | None = setting(
        None,
        f"peak learning rate of AdamW (default: {ADAPTER_LR:g} for an adapter, {FULL_LR:g} for --method full: "
        "whole-model fine-tuning runs a decade or more lower)",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay")
    loraplus_lr_ratio: float | None = setting(
        None,
        "LoRA+: the learning rate of the adapters' B over that of everything else trained (A, a task head). "
        "Default: 1, and 16 for peft-loraplus",
    )
    warmup_ratio: float = setting(0.06, "fraction of steps of linear learning-rate warm-up")
    lr_schedule: str = setting(
        "linear",
        "after the warm-up: linear (decay to 0 at the last step) | constant (hold the peak: with --eval-every, the "
        "best evaluation's adapter is kept in best/)",
        choices=LR_SCHEDULES,
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: off)")
    seed: int = setting(0, "seed of data order, initialisation and dropout")
    device: str = setting(
        "auto",
        "where to compute: auto (CUDA, else MPS, else CPU) | cpu | cuda | mps",
        choices=DEVICES,
        run_only=True,  # a checkpoint resumes on another device
    )
    load_in_4bit: bool = setting(False, "load the base model's linear layers in 4 bits (NF4, bitsandbytes: QLoRA)")
    load_in_8bit: bool = setting(False, "load the base model's linear layers in 8 bits (bitsandbytes)")
    precision: str = setting(
        "fp32",
        "fp32 | bf16 | fp16 (autocast; fp16 with loss scaling); adapters and optimizer stay float32",
        choices=PRECISIONS,
    )
    fsdp: bool = setting(
        False,
        "under torchrun: shard the frozen base model over the processes (FSDP2); the adapters stay whole on each",
        run_only=True,  # the trainable state is the same however the frozen base is laid out
    )
    eval_every: int = setting(0, "evaluate every N steps (0: only at the end)", run_only=True)
    save_every: int = setting(0, "checkpoint every N steps (0: only at the end or on interrupt)", run_only=True)
    log_every: int = setting(10, "write a loss record to log.jsonl every N steps", run_only=True)
    max_nonfinite_steps: int = setting(5, "stop after this many non-finite steps in a row", run_only=True)
    output_dir: str = setting(
        "runs/latest", "run directory (the command's default: runs/<task>-<method>-<time>)", run_only=True
    )
    resume: bool = setting(False, "continue the run in --output-dir from its last checkpoint", run_only=True)
    progress: bool = setting(True, "show a progress bar", run_only=True)
    adapter: DynamicLoRAConfig = field(default_factory=DynamicLoRAConfig)

    def __post_init__(self) -> None:
        if self.max_steps is None:  # the run's length when neither it nor epochs is given, whatever the entry point
            self.max_steps = QUICK_STEPS if self.epochs is None and not self.train_file else 0
        if self.epochs is None:
            self.epochs = 1.0
        if self.lr is None:
            self.lr = FULL_LR if self.method == "full" else ADAPTER_LR
        if isinstance(self.adapter, dict):
            self.adapter = DynamicLoRAConfig.from_dict(self.adapter)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):  # 0 would leave nothing to train on or score
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or left out for all), got {value}")
        if self.max_steps < 0 or (self.max_steps == 0 and not self.epochs > 0):
            raise ValueError("give --max-steps > 0 or --epochs > 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        ratio = self.loraplus_lr_ratio
        if ratio is not None and not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"loraplus_lr_ratio must be a finite number > 0 (LoRA+ uses 16), got {ratio}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit: choose one")
        if self.fsdp and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError(
                "--fsdp does not shard bitsandbytes' quantised weights: drop --fsdp (a 4-bit base is small) or "
                "--load-in-4bit/--load-in-8bit"
            )
        if self.method == "full":
            self._check_full()
        if self.adapter.init == "lora-ga" and self.method == "dynamic":
            if self.fsdp:
                raise ValueError("--init lora-ga offsets the base weights, which --fsdp shards: drop one of them")
            if self.load_in_4bit or self.load_in_8bit:
                raise ValueError(
                    "--init lora-ga offsets the base weights, which a quantised base cannot hold exactly: drop "
                    "--load-in-4bit/--load-in-8bit, or use --init gradient"
                )

    def _check_full(self) -> None:
        """What full fine-tuning cannot do: train quantised weights, keep a frozen base to shard, speed up B."""
        if self.load_in_4bit or self.load_in_8bit:
            raise ValueError(
                "--method full trains every weight, which a 4- or 8-bit base cannot hold: drop "
                "--load-in-4bit/--load-in-8bit, or train an adapter on it (QLoRA: --method dynamic)"
            )
        if self.fsdp:
            raise ValueError("--fsdp shards the frozen base, and --method full freezes nothing: drop --fsdp")
        if self.loraplus_lr_ratio is not None:
            raise ValueError("--loraplus-lr-ratio speeds up the adapters' B, and --method full has none: drop it")

    def sized(self, language_model: bool, positions: int | None) -> TrainSettings:
        """These settings with the batch size and max length the user left out filled in (:func:`default_sizes`)."""
        given = {k: v for k, v in (("batch_size", self.batch_size), ("max_length", self.max_length)) if v is not None}
        return dataclasses.replace(self, **{**default_sizes(language_model, positions), **given})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this run: every setting that changes the trajectory
        (not logging, progress or output settings), with the adapter settings that the method really uses."""
        from .methods import get_method

        identity = {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY}
        return {**identity, "adapter": get_method(self.method).identity(self.adapter)}

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> TrainSettings:
        """From plain, already typed settings (a nested ``adapter`` dict included); an unknown name is an error."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; see dynlora train --help")
        return cls(**settings)


def default_sizes(language_model: bool, positions: int | None) -> dict[str, int]:
    """``batch_size`` and ``max_length`` when not given. A classifier's sentences are short: 32 x 128 tokens. A
    language model's examples are long and its steps costly: 8 examples of up to 1024 tokens (or the model's
    positions if fewer), as LLM recipes run; batches pad to their longest example, so short ones cost no more."""
    if not language_model:
        return {"batch_size": 32, "max_length": 128}
    return {"batch_size": 8, "max_length": min(1024, positions or 1024)}


# Settings that do not change what a run computes (run_only): a checkpoint resumes whatever they are. How long a run
# trains (length): `dynlora train --resume --max-steps N` may change it, to extend a run.
RUN_ONLY = frozenset(tagged(TrainSettings, "run_only"))
LENGTH = frozenset(tagged(TrainSettings, "length"))


def as_saved(settings: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """``settings`` to resume the run in ``run_dir`` with (``dynlora compare`` builds them from its plan): an adapter
    setting that the run's config.json predates takes the value that run used (``PREDATING``)."""
    path = Path(run_dir) / "config.json"
    saved = (json.loads(path.read_text()).get("adapter") or {}) if path.is_file() else None
    if saved is None:
        return settings
    missing = {k: v for k, v in PREDATING.items() if k not in saved}
    return {**settings, "adapter": {**(settings.get("adapter") or {}), **missing}} if missing else settings


def resumed_settings(
    saved: dict[str, Any], given: dict[str, Any], where: str
) -> tuple[TrainSettings, dict[str, tuple[Any, Any]]]:
    """The settings of a run being resumed: those it was started with (its ``config.json``, ``saved``), with the
    ``given`` ones that do not change what it computes (output, logging, evaluation) applied, and a new length
    (``max_steps``, ``epochs``: the run is extended). A given setting that would change the run otherwise is an error
    naming it. Returns the settings and the changes applied: ``{name: (old, new)}``."""
    merged = {**saved, "adapter": written_settings(saved.get("adapter") or {})}
    changes = {}
    for key, value in given.items():
        pairs = value.items() if key == "adapter" else [(key, value)]
        for name, new in pairs:
            old = merged["adapter"].get(name) if key == "adapter" else merged.get(name)
            label = f"adapter.{name}" if key == "adapter" else name
            if new == old:
                continue
            if key == "adapter" or name not in RUN_ONLY | LENGTH:
                raise ValueError(
                    f"{label} was {old!r} in the run in {where}, not {new!r}: --resume continues a run with its own "
                    "settings (only output, logging and evaluation settings may change, and --max-steps or --epochs "
                    "to extend it); drop it, or start a new --output-dir"
                )
            if name != "resume":
                changes[name] = (old, new)
            merged[name] = new
    return TrainSettings.from_settings({**merged, "resume": True}), changes


# Every setting of a run, as the command line and config files see them (fields.py).
SETTINGS = settings_of(TrainSettings) + settings_of(DynamicLoRAConfig, adapter=True)
