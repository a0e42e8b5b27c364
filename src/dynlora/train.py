"""Fine-tune a sequence classifier on a GLUE task (or user data) with one of the adapter methods.

The loop is plain PyTorch: AdamW, linear warm-up/decay, gradient accumulation and clipping, evaluation every N
steps and at the end, best-adapter tracking, a JSONL log, and checkpoints that make ``resume=True`` continue
*exactly* (the data order is a function of (seed, epoch); RNG, optimizer, scheduler and allocator state are saved
at optimizer-step boundaries). SIGINT/SIGTERM finish the current step, save, and exit with a message saying how to
resume. Under ``torchrun`` every process trains on its shard of each batch (DDP, gloo on CPU). A regression
task's new head starts at the mean of the training labels (see ``center_regression_head``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import DataError, batches, collate, epoch_order, load_custom, load_glue, task_spec, tokenize
from .io import write_json
from .methods import METHODS, Adapted, AdapterSettings, adapt, adapter_identity, settings_before
from .metrics import glue_metrics, run_score
from .models import resolve_model_path
from .targets import HEAD_MODULE_NAMES


@dataclass
class TrainConfig:
    """Everything a run depends on. ``max_steps`` > 0 overrides ``epochs``."""

    task: str = "sst2"
    model: str | None = None
    method: str = "dynamic"
    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    text_col: str = "text"
    text_pair_col: str | None = None
    label_col: str = "label"
    regression: bool = False
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    max_nonfinite_steps: int = 5
    output_dir: str = "runs/latest"
    resume: bool = False
    progress: bool = True
    adapter: AdapterSettings = field(default_factory=AdapterSettings)

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterSettings(**self.adapter)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):  # 0 would leave nothing to train on or score
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (or left out for all), got "
                                 f"{getattr(self, name)}")  # fmt: skip
        if self.max_steps < 0 or (self.max_steps == 0 and not self.epochs > 0):
            raise ValueError("give --max-steps > 0 or --epochs > 0")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed by this run (not logging or progress settings)."""
        skip = {"resume", "progress", "eval_every", "save_every", "log_every", "output_dir", "max_eval_samples",
                "max_nonfinite_steps"}  # fmt: skip
        identity = {k: v for k, v in self.to_dict().items() if k not in skip}
        return {**identity, "adapter": adapter_identity(self.method, identity["adapter"])}


# --- data ------------------------------------------------------------------------------------------------------


def load_splits(cfg: TrainConfig) -> tuple[dict[str, list], tuple[str, ...] | None, bool, str]:
    """(splits, label names, regression?, metric task). User files use accuracy (or Pearson/Spearman)."""
    if cfg.train_file:
        if not cfg.dev_file:
            raise DataError("--train-file needs --dev-file too (the evaluation data)")
        cols = (cfg.text_col, cfg.text_pair_col, cfg.label_col)
        train, labels = load_custom(cfg.train_file, *cols, regression=cfg.regression)
        dev, _ = load_custom(cfg.dev_file, *cols, labels=labels, regression=cfg.regression)
        return {"train": train, "validation": dev}, labels, cfg.regression, "stsb" if cfg.regression else "sst2"
    spec = task_spec(cfg.task)
    return load_glue(spec.name, cfg.data_dir), spec.labels, spec.is_regression, spec.name


def _subset(examples: list, limit: int | None, seed: int) -> list:
    if limit is None or limit >= len(examples):
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


# --- model -----------------------------------------------------------------------------------------------------


def load_base(model: str | None, num_labels: int, regression: bool):
    """(model with a sequence-classification head, tokenizer, names of the parameters newly initialised)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A checkpoint whose head has another number of labels (e.g. a classifier reused for STS-B) gets a new
        # head for this task, as fine-tuning needs anyway; the encoder weights still load.
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True,
            problem_type="regression" if regression else "single_label_classification",
        )  # fmt: skip
    except OSError as e:
        raise ValueError(f"cannot load a model from {model or path!r}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with EOS, as is usual for classification
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    return base, tokenizer, set(info.get("missing_keys", ())) | mismatched


@torch.no_grad()
def center_regression_head(model: torch.nn.Module, fresh: set[str], mean: float) -> bool:
    """Start a newly initialised one-output regression head at the training labels' mean (its bias), as one
    initialises a final layer to the scale of the data. ``fresh``: the parameter names the checkpoint did not
    provide (a head loaded with the model is left alone). False when there is nothing to set (Llama's ``score``
    has no bias).

    A fresh head predicts ~0 where STS-B's labels average 2.7: the first steps' large, uniform error then reaches
    the adapters as a push to move every prediction the same way, which can leave the model predicting the mean.
    """
    heads = [(name, m) for name, m in model.named_modules() if name.split(".")[0] in HEAD_MODULE_NAMES
             and isinstance(m, torch.nn.Linear) and m.out_features == 1]  # fmt: skip
    if not heads or heads[-1][1].bias is None or f"{heads[-1][0]}.bias" not in fresh:
        return False
    heads[-1][1].bias.fill_(mean)
    return True


@torch.no_grad()
def evaluate_features(model, features: list[dict], metric_task: str, regression: bool, batch_size: int,
                      pad_token_id: int) -> dict[str, float]:  # fmt: skip
    """GLUE metrics of ``model`` (left in eval mode) on tokenised ``features``."""
    model.eval()
    preds, gold = [], []
    for batch in batches(features, range(len(features)), batch_size, pad_token_id):
        labels = batch.pop("labels")
        logits = model(**batch).logits
        preds += (logits.squeeze(-1) if regression else logits.argmax(-1)).tolist()
        gold += labels.tolist()
    return glue_metrics(metric_task, preds, gold)


# --- the run ---------------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _checkpoint_tensors(adapted: Adapted) -> dict[str, torch.Tensor]:
    """Trainable parameters at full capacity, plus the input gate's running statistics."""
    state = adapted.model.state_dict()
    names = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names or ".input_norm." in k}


def _rank_summary(ranks: dict[str, int]) -> str:
    if not ranks:
        return ""
    values = list(ranks.values())
    return f"{min(values)}-{max(values)}"


class Trainer:
    """One training run; ``run()`` trains, evaluates and returns the final metrics."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.rank, self.world = _distributed()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        splits, self.labels, self.regression, self.metric_task = load_splits(cfg)
        num_labels = 1 if self.regression else len(self.labels)
        base, self.tokenizer, fresh = load_base(cfg.model, num_labels, self.regression)
        train = _subset(splits["train"], cfg.max_train_samples, cfg.seed)
        if self.regression:
            center_regression_head(base, fresh, sum(e.label for e in train) / len(train))
        self.train_features = tokenize(train, self.tokenizer, cfg.max_length)
        self.eval_features = {
            name: tokenize(_subset(examples, cfg.max_eval_samples, cfg.seed), self.tokenizer, cfg.max_length)
            for name, examples in splits.items()
            if name != "train"
        }
        per_step = cfg.batch_size * cfg.grad_accum * self.world
        self.batches_per_epoch = math.ceil(len(self.train_features) / (cfg.batch_size * self.world))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_features) / per_step))

        torch.manual_seed(cfg.seed)  # adapter init does not depend on how much data was tokenised
        self.adapted = adapt(cfg.method, base, cfg.adapter, self.total_steps)
        self.model = self.adapted.model
        self.forward_model = self.model
        if self.world > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers import get_linear_schedule_with_warmup

        warmup = int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.adapted.bind(self.optimizer, self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (skipped steps consume data but are not optimizer steps)
        self.skipped = 0
        self.best: dict[str, Any] | None = None
        self._epoch_cache: tuple[int, list[int]] | None = None
        self.tensorboard = None  # opened by run(), once the output directory is known to be ours

    # --- data stream ---------------------------------------------------------------------------------------------

    def micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch k of the run's stream: a pure function of (seed, k), this process's shard of it."""
        epoch, b = divmod(k, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_order(len(self.train_features), self.cfg.seed, epoch))
        order = self._epoch_cache[1]
        size = self.cfg.batch_size * self.world
        chunk = order[b * size : (b + 1) * size][self.rank :: self.world]
        return collate([self.train_features[i] for i in chunk], self.tokenizer.pad_token_id)

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, dict[str, float]]:
        results = {
            split: evaluate_features(
                self.model,
                features,
                self.metric_task,
                self.regression,
                2 * self.cfg.batch_size,
                self.tokenizer.pad_token_id,
            )
            for split, features in self.eval_features.items()
        }
        self.model.train()
        return results

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save(self) -> None:
        if self.rank == 0:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "method": self.adapted.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": list(random.getstate()[1]),
                "best": json.dumps(self.best),
                "micro": self.micro,
                "skipped": self.skipped,
            }
            save_checkpoint(self.out / "checkpoints", self.step, _checkpoint_tensors(self.adapted), state,
                            self.cfg.identity())  # fmt: skip
        if self.world > 1:
            torch.distributed.barrier()

    def restore(self) -> None:
        tensors, state, step = load_checkpoint(self.out / "checkpoints", self.cfg.identity(),
                                               settings_before(self.cfg.method))  # fmt: skip
        missing = set(_checkpoint_tensors(self.adapted)) - set(tensors)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors this run trains, e.g. {sorted(missing)[0]}")
        self.model.load_state_dict(tensors, strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.adapted.load_state_dict(state["method"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        self.best = json.loads(state["best"])
        self.step, self.micro, self.skipped = step, int(state["micro"]), int(state["skipped"])
        self._truncate_log(step)

    def save_best(self, metrics: dict[str, dict[str, float]]) -> None:
        score = run_score(metrics)
        if self.best is not None and score <= self.best["score"]:
            return
        self.best = {"score": score, "step": self.step, "metrics": metrics}
        if self.rank != 0:
            return
        tmp, final = self.out / ".best.tmp", self.out / "best"
        shutil.rmtree(tmp, ignore_errors=True)
        self.adapted.save_adapter(tmp)
        write_json(tmp / "metrics.json", self.best)
        old = self.out / ".best.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    # --- logging -------------------------------------------------------------------------------------------------

    def log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            step = record["step"]
            for key in ("loss", "lr"):
                if key in record:
                    self.tensorboard.add_scalar(f"train/{key}", record[key], step)
            for split, metrics in record.get("metrics", {}).items():
                for name, value in metrics.items():
                    self.tensorboard.add_scalar(f"{split}/{name}", value, step)
            for name, rank in (record.get("ranks") or {}).items():
                self.tensorboard.add_scalar(f"rank/{name}", rank, step)

    def _truncate_log(self, step: int) -> None:
        """Drop log records past the checkpoint we resume from: the resumed run writes them again."""
        path = self.out / "log.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.restore()
        elif latest_checkpoint(self.out / "checkpoints") is not None:
            raise ValueError(f"{self.out} already holds a run's checkpoints; pass --resume, or a new --output-dir")
        elif self.rank == 0 and (self.out / "log.jsonl").exists():
            # A run killed before its first checkpoint: nothing to resume; keep its log aside, start a clean one.
            os.replace(self.out / "log.jsonl", self.out / "log.previous.jsonl")
        if self.rank == 0:
            write_json(self.out / "config.json", cfg.to_dict())
            try:  # TensorBoard when installed; the JSONL log is always written
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                pass
        if self.step == 0:
            params = self.adapted.trainable_parameters()
            self.log({"step": 0, "event": "start", "method": cfg.method, "total_steps": self.total_steps,
                      "trainable_parameters": params, "world_size": self.world})  # fmt: skip
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.method} {cfg.task}",
                   disable=not cfg.progress or self.rank != 0, dynamic_ncols=True)  # fmt: skip
        self.model.train()
        history_seen = len(getattr(getattr(self.model, "allocator", None), "history", []) or [])
        started, interrupted = time.time(), False
        with _StopFlag() as stop:
            in_a_row = 0
            while self.step < self.total_steps:
                loss = self._train_step()
                if loss is None:
                    self.skipped += 1
                    in_a_row += 1
                    self.log({"step": self.step, "event": "skipped_nonfinite", "micro_batch": self.micro})
                    if in_a_row >= cfg.max_nonfinite_steps:
                        bar.close()
                        raise Diverged(
                            f"loss or gradients were not finite for {in_a_row} steps in a row (at step {self.step});"
                            " lower --lr or check the data. The last checkpoint was kept."
                        )
                    continue
                in_a_row = 0
                self.step += 1
                bar.update(1)
                ranks = self.adapted.ranks()
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                **({"ranks": _rank_summary(ranks)} if ranks else {}))  # fmt: skip
                allocator = getattr(self.model, "allocator", None)
                if allocator is not None and len(allocator.history) > history_seen:
                    history_seen = len(allocator.history)
                    self.log({"step": self.step, "event": "allocation", **allocator.history[-1]})
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    self.log({"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "elapsed": time.time() - started, "ranks": ranks})  # fmt: skip
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    metrics = self.evaluate()
                    self.log({"step": self.step, "event": "eval", "metrics": metrics})
                    self.save_best(metrics)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                if stop.requested:
                    interrupted = True
                    break
        bar.close()
        if self.tensorboard is not None:
            self.tensorboard.flush()
        if interrupted:
            self.save()
            raise Interrupted(self.step, self.out)
        metrics = self.evaluate()
        self.log({"step": self.step, "event": "eval", "metrics": metrics, "final": True})
        self.save_best(metrics)
        self.save()
        result = {"task": cfg.task, "method": cfg.method, "seed": cfg.seed, "steps": self.step,
                  "skipped_nonfinite_steps": self.skipped,
                  "trainable_parameters": self.adapted.trainable_parameters(), "metrics": metrics,
                  "best": self.best, "ranks": self.adapted.ranks()}  # fmt: skip
        if self.rank == 0:
            write_json(self.out / "results.json", result)
            self.adapted.save_adapter(self.out / "adapter")
        return result

    def _train_step(self) -> float | None:
        """One optimizer step; None when it was skipped for a non-finite loss or gradient."""
        cfg = self.cfg
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = self.micro_batch(self.micro)
            self.micro += 1
            loss = self.forward_model(**batch).loss / cfg.grad_accum
            loss.backward()
            total += loss.item()
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if not (math.isfinite(total) and torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.adapted.skip_step()
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.adapted.after_optimizer_step(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return total


class Diverged(RuntimeError):
    """Too many non-finite steps in a row."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, step: int, out: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved. Resume with: --output-dir {out} --resume")
        self.step, self.out = step, out

    def __reduce__(self):  # crosses process boundaries intact (dynlora compare --jobs)
        return Interrupted, (self.step, self.out)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and save one run (see the module doc); returns the final results."""
    return Trainer(cfg).run()
