"""The training loop: fine-tune a sequence classifier with one adapter method, evaluate, save.

Plain PyTorch: AdamW, linear warm-up/decay, gradient accumulation and clipping, evaluation every N steps and at the
end, best-adapter tracking, a JSONL log, and checkpoints that make ``resume=True`` continue *exactly* (the data
order is a function of (seed, epoch); RNG, optimizer, scheduler and method state are saved at optimizer-step
boundaries). SIGINT/SIGTERM finish the current step, save, and exit with a message saying how to resume. Under
``torchrun`` every process trains on its shard of each batch (DDP, gloo on CPU). A regression task's new head
starts at the mean of the training labels (``center_regression_head``).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io import replace_directory, write_json
from .base_model import BaseModel, center_regression_head, load_base
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import TaskData, collate, epoch_order, load_task_data, tokenize
from .data.splits import subset
from .errors import Diverged, Interrupted
from .evaluation import evaluate
from .methods import AdaptedModel, get_method
from .metrics import run_score
from .processes import StopFlag, barrier, init_distributed
from .run_log import RunLog
from .settings import TrainSettings


class TrainingRun:
    """One run of ``settings``; :meth:`run` trains, evaluates, saves and returns the final results.

    ``data`` and ``base`` are loaded from the settings unless given (a test or a caller with its own model)."""

    def __init__(self, settings: TrainSettings, data: TaskData | None = None, base: BaseModel | None = None) -> None:
        self.settings = s = settings
        self.out = Path(s.output_dir)
        self.process_index, self.world = init_distributed()
        random.seed(s.seed)
        torch.manual_seed(s.seed)

        self.data = data = data if data is not None else load_task_data(s)
        base = base if base is not None else load_base(s.model, data.num_labels, data.regression)
        self.tokenizer = base.tokenizer
        train = subset(data.splits["train"], s.max_train_samples, s.seed)
        if data.regression:
            center_regression_head(base.model, base.fresh, sum(e.label for e in train) / len(train))
        self.train_features = tokenize(train, self.tokenizer, s.max_length)
        self.eval_features = {
            name: tokenize(subset(examples, s.max_eval_samples, s.seed), self.tokenizer, s.max_length)
            for name, examples in data.splits.items()
            if name != "train"
        }
        per_step = s.batch_size * s.grad_accum * self.world
        self.batches_per_epoch = math.ceil(len(self.train_features) / (s.batch_size * self.world))
        self.total_steps = s.max_steps or max(1, math.ceil(s.epochs * len(self.train_features) / per_step))

        torch.manual_seed(s.seed)  # adapter init does not depend on how much data was tokenised
        self.adapted: AdaptedModel = get_method(s.method).wrap(base.model, s.adapter, self.total_steps)
        self.model = self.adapted.model
        self.forward_model = self.model
        if self.world > 1:
            self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        from transformers import get_linear_schedule_with_warmup

        warmup = int(s.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.adapted.bind(self.optimizer, self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (skipped steps consume data but are not optimizer steps)
        self.skipped = 0
        self.best: dict[str, Any] | None = None
        self._epoch_cache: tuple[int, list[int]] | None = None
        self.log = RunLog(self.out, enabled=self.process_index == 0)

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (the first process of a distributed run)."""
        return self.process_index == 0

    def micro_batch(self, k: int) -> dict[str, torch.Tensor]:
        """Micro-batch k of the run's stream: a pure function of (seed, k), this process's shard of it."""
        epoch, b = divmod(k, self.batches_per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, epoch_order(len(self.train_features), self.settings.seed, epoch))
        size = self.settings.batch_size * self.world
        chunk = self._epoch_cache[1][b * size : (b + 1) * size][self.process_index :: self.world]
        return collate([self.train_features[i] for i in chunk], self.tokenizer.pad_token_id)

    def evaluate(self) -> dict[str, dict[str, float]]:
        batch_size, pad = 2 * self.settings.batch_size, self.tokenizer.pad_token_id
        data = self.data
        results = {
            split: evaluate(self.model, features, data.metric_task, data.regression, batch_size, pad)
            for split, features in self.eval_features.items()
        }
        self.model.train()
        return results

    # --- checkpoints -------------------------------------------------------------------------------------------

    def _checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Trainable parameters at full capacity, plus the input adaptation's running statistics."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.model.state_dict().items() if k in names or ".input_norm." in k}

    def save(self) -> None:
        if self.writer:
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
            identity = self.settings.identity()
            save_checkpoint(self.out / "checkpoints", self.step, self._checkpoint_tensors(), state, identity)
        barrier(self.world)

    def restore(self) -> None:
        tensors, state, step = load_checkpoint(self.out / "checkpoints", self.settings.identity())
        missing = set(self._checkpoint_tensors()) - set(tensors)
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
        self.log.truncate(step)

    def save_best(self, metrics: dict[str, dict[str, float]]) -> None:
        score = run_score(metrics)
        if self.best is not None and score <= self.best["score"]:
            return
        self.best = {"score": score, "step": self.step, "metrics": metrics}
        if self.writer:
            best = self.best

            def write(tmp: Path) -> None:
                self.adapted.save(tmp)
                write_json(tmp / "metrics.json", best)

            replace_directory(self.out / "best", write)

    # --- the loop ----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.settings.resume:
            self.restore()
        elif latest_checkpoint(self.out / "checkpoints") is not None:
            raise ValueError(f"{self.out} already holds a run's checkpoints; pass --resume, or a new --output-dir")
        else:
            self.log.set_aside()
        if self.writer:
            write_json(self.out / "config.json", self.settings.to_dict())
        self.log.open()
        if self.step == 0:
            self.log.write(
                {
                    "step": 0,
                    "event": "start",
                    "method": self.settings.method,
                    "world_size": self.world,
                    "total_steps": self.total_steps,
                    "trainable_parameters": self.adapted.trainable_parameters(),
                }
            )

    def run(self) -> dict[str, Any]:
        s = self.settings
        self._start()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{s.method} {s.task}",
            disable=not s.progress or not self.writer,
            dynamic_ncols=True,
        )
        self.model.train()
        events_seen = len(self.adapted.allocation_events())
        started, interrupted, in_a_row = time.time(), False, 0
        with StopFlag() as stop:
            while self.step < self.total_steps:
                loss = self._train_step()
                if loss is None:
                    self.skipped += 1
                    in_a_row += 1
                    self.log.write({"step": self.step, "event": "skipped_nonfinite", "micro_batch": self.micro})
                    if in_a_row >= s.max_nonfinite_steps:
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
                lr = self.scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **({"ranks": _span(ranks)} if ranks else {}))
                events = self.adapted.allocation_events()
                for event in events[events_seen:]:
                    self.log.write({"step": self.step, "event": "allocation", **event})
                events_seen = len(events)
                if self.step % s.log_every == 0 or self.step == self.total_steps:
                    self.log.write(
                        {"step": self.step, "loss": loss, "lr": lr, "elapsed": time.time() - started, "ranks": ranks}
                    )
                if s.eval_every and self.step % s.eval_every == 0 and self.step < self.total_steps:
                    metrics = self.evaluate()
                    self.log.write({"step": self.step, "event": "eval", "metrics": metrics})
                    self.save_best(metrics)
                if s.save_every and self.step % s.save_every == 0:
                    self.save()
                if stop.requested:
                    interrupted = True
                    break
        bar.close()
        self.log.flush()
        if interrupted:
            self.save()
            raise Interrupted(self.step, self.out)
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        s = self.settings
        metrics = self.evaluate()
        self.log.write({"step": self.step, "event": "eval", "metrics": metrics, "final": True})
        self.save_best(metrics)
        self.save()
        result = {
            "task": s.task,
            "method": s.method,
            "seed": s.seed,
            "steps": self.step,
            "skipped_nonfinite_steps": self.skipped,
            "trainable_parameters": self.adapted.trainable_parameters(),
            "metrics": metrics,
            "best": self.best,
            "ranks": self.adapted.ranks(),
        }
        if self.writer:
            write_json(self.out / "results.json", result)
            self.adapted.save(self.out / "adapter")
        return result

    def _train_step(self) -> float | None:
        """One optimizer step; None when it was skipped for a non-finite loss or gradient."""
        grad_accum = self.settings.grad_accum
        total = 0.0
        for _ in range(grad_accum):
            batch = self.micro_batch(self.micro)
            self.micro += 1
            loss = self.forward_model(**batch).loss / grad_accum
            loss.backward()
            total += loss.item()
        clip = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        if not (math.isfinite(total) and torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.adapted.skip_step()
            return None
        self.optimizer.step()
        self.scheduler.step()
        self.adapted.after_step(self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return total


def _span(ranks: dict[str, int]) -> str:
    values = list(ranks.values())
    return f"{min(values)}-{max(values)}"


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train, evaluate and save one run (see the module doc); returns the final results."""
    return TrainingRun(settings).run()
