"""The training loop: fine-tune a model for its task (tasks.py) with one adapter method, evaluate, save.

Plain PyTorch: AdamW, linear warm-up/decay, gradient accumulation and clipping, evaluation every N steps and at the
end, best-adapter tracking, a JSONL log, and checkpoints that make ``resume=True`` continue *exactly* (the data
order is a function of (seed, epoch); RNG, optimizer, scheduler and method state are saved at optimizer-step
boundaries). SIGINT/SIGTERM finish the current step, save, and exit with a message saying how to resume. Under
``torchrun`` every process trains on its shard of each global batch and the trainable parameters' gradients are
averaged after each backward pass; with ``--fsdp`` the frozen base is sharded over the processes too
(dynlora/distributed.py).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..distributed import average_gradients, shard_frozen
from ..io import write_json
from .base_model import BaseModel
from .checkpoint import RunCheckpoints, data_digests, latest_checkpoint
from .devices import Precision, resolve_device, to_device
from .errors import Diverged, Interrupted
from .lr_schedule import follow_schedule_from, make_scheduler
from .outputs import RunOutputs
from .parts import build_parts
from .processes import StopFlag, barrier, init_distributed
from .run_dir import RunDirectory
from .run_log import RunLog
from .settings import LENGTH, TrainSettings
from .tasks import Task


class TrainingRun:
    """One run of ``settings``; :meth:`run` trains, evaluates, saves and returns the final results.

    ``task`` and ``base`` are loaded from the settings unless given (a test or a caller with its own model). The
    output directory is claimed first (run_dir.py), so a directory that cannot be this run's is refused before
    anything is loaded."""

    def __init__(
        self, settings: TrainSettings, task: Task | None = None, base: BaseModel | None = None, extend: bool = False
    ) -> None:
        """``extend``: a resumed run whose length (``max_steps``, ``epochs``) differs from its checkpoint's goes on
        to the new length, its lr and re-allocation schedules now those of a run of that length."""
        self.settings, self.extend = settings, extend
        self.out = Path(settings.output_dir)
        self.device = resolve_device(settings.device)
        self.precision = Precision(settings.precision, self.device)
        self.process_index, self.world = init_distributed(self.device)
        self.run_dir = RunDirectory(self.out)
        if self.writer:
            self.run_dir.claim(settings.resume)
        try:
            parts = build_parts(settings, self.device, self.precision.dtype, self.process_index, self.world, task, base)
        except BaseException:
            self.release(failed=True)
            raise
        self.settings, self.total_steps = parts.settings, parts.total_steps
        # an edited training file is other data: its contents are part of what a checkpoint must agree on
        digests = data_digests(settings.train_file)
        self.checkpoints = RunCheckpoints(self.out / "checkpoints", parts.settings.identity(), digests, self.writer)
        self.task, self.tokenizer, self.stream = parts.task, parts.tokenizer, parts.stream
        self.eval_sets, self.adapted, self.model = parts.eval_sets, parts.adapted, parts.adapted.model
        s = self.settings
        self.outputs = RunOutputs(
            self.out, self.writer, self.adapted, self.tokenizer, self.task.prompt_format, s.max_length
        )
        if s.fsdp and self.world > 1:
            shard_frozen(self.model)
        elif s.fsdp and self.writer:
            warnings.warn("--fsdp with one process shards nothing: use torchrun --nproc_per_node N", stacklevel=2)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self.adapted.make_optimizer(s.lr, s.weight_decay, s.loraplus_lr_ratio)
        self.scheduler = make_scheduler(self.optimizer, s, self.total_steps)
        self.adapted.bind(self.optimizer, self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (skipped steps consume data but are not optimizer steps)
        self.skipped = 0
        self._reallocated: list[dict[str, Any]] = []  # the re-allocations of the last step, to log
        self.best: dict[str, Any] | None = None
        self.peak = self.adapted.trainable_parameters()  # an over-parameterised start is pruned while training
        self.already_finished = False
        self.log = RunLog(self.out, enabled=self.writer)
        self.stop = StopFlag()
        self.stop_agreed = False

    @property
    def train_features(self) -> list[dict]:
        return self.stream.features

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (the first process of a distributed run)."""
        return self.process_index == 0

    def release(self, failed: bool = False) -> None:
        """Give the output directory up; a run that failed before any checkpoint leaves nothing behind."""
        early = latest_checkpoint(self.out / "checkpoints") is None
        self.run_dir.release(failed=failed, before_a_checkpoint=early)

    def evaluate(self) -> dict[str, dict[str, float]]:
        batch_size = 2 * self.settings.batch_size
        with self.precision.autocast():
            results = {
                split: self.task.evaluate(self.model, self.tokenizer, eval_set, batch_size)
                for split, eval_set in self.eval_sets.items()
            }
        self.model.train()
        return results

    # --- checkpoints -------------------------------------------------------------------------------------------

    def save(self) -> None:
        counters = {"best": self.best, "micro": self.micro, "skipped": self.skipped, "peak": self.peak}
        self.checkpoints.save(self.step, self.adapted, self.optimizer, self.scheduler, counters)
        barrier(self.world)

    def restore(self) -> None:
        ignored = LENGTH if self.extend else frozenset()
        step, counters = self.checkpoints.restore(self.adapted, self.optimizer, self.scheduler, ignored)
        if step > self.total_steps:
            raise ValueError(
                f"the run in {self.out} is at step {step}, past the {self.total_steps} steps asked for: extend it with "
                f"--max-steps above {step}"
            )
        if self.extend:
            follow_schedule_from(self.optimizer, self.scheduler, step)
        self.best, self.micro, self.skipped = counters["best"], counters["micro"], counters["skipped"]
        self.peak = max(counters["peak"], self.adapted.trainable_parameters())
        self.step = step
        self.log.truncate(step)

    # --- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to the end (or resume and finish), evaluate, save; the results. A run that had already finished
        returns its saved results and writes nothing."""
        failed = True
        try:
            if self.settings.resume:
                self.restore()
            finished = self.out / "results.json"
            self.already_finished = self.step >= self.total_steps and finished.is_file()
            if self.already_finished:
                failed = False
                return json.loads(finished.read_text())
            result = self._train()
            failed = False
            return result
        finally:
            self.release(failed=failed)

    def _train(self) -> dict[str, Any]:
        s = self.settings
        if self.step == 0:
            self.log.set_aside()
        if self.writer:
            write_json(self.out / "config.json", s.to_dict())
        self.log.open(purge_step=self.step if self.step else None)
        if self.step == 0:
            params, main_metric = self.adapted.trainable_parameters(), self.task.main_metric
            self.log.write(
                {
                    "step": 0,
                    "event": "start",
                    "method": s.method,
                    "world_size": self.world,
                    "total_steps": self.total_steps,
                    "trainable_parameters": params,
                    "ranks": self.adapted.ranks(),
                    "main_metric": main_metric,
                }
            )
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{s.method} {Path(self.task.name).name}",
            disable=not s.progress or not self.writer,
            dynamic_ncols=True,
        )
        self.model.train()
        self._started = time.time()
        interrupted, in_a_row = False, 0
        with StopFlag() as self.stop:
            while self.step < self.total_steps:
                loss = self._train_step()
                if loss is None:
                    self.skipped += 1
                    in_a_row += 1
                    self.log.write({"step": self.step, "event": "skipped_nonfinite", "micro_batch": self.micro})
                    if in_a_row >= s.max_nonfinite_steps:
                        bar.close()
                        kept = latest_checkpoint(self.out / "checkpoints") is not None
                        raise Diverged(in_a_row, self.step, kept)
                    continue
                in_a_row = 0
                self.step += 1
                bar.update(1)
                self._after_step(loss, bar)
                if self.stop_agreed or (self.world == 1 and self.stop.requested):
                    interrupted = True
                    break
        bar.close()
        self.log.flush()
        if interrupted:
            self.save()
            raise Interrupted(self.step, self.out, self.world)
        return self._finish()

    def _after_step(self, loss: float, bar) -> None:
        """Log, evaluate and checkpoint as the settings ask, after optimizer step ``self.step``."""
        s = self.settings
        ranks, lr = self.adapted.ranks(), self.scheduler.get_last_lr()[0]
        span = {"ranks": f"{min(ranks.values())}-{max(ranks.values())}"} if ranks else {}
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", **span)
        for event in self._reallocated:
            self.log.write({"step": self.step, "event": "allocation", **event})
        if self._reallocated:
            self.peak = max(self.peak, self.adapted.trainable_parameters())
        if self.step % s.log_every == 0 or self.step == self.total_steps:
            elapsed = time.time() - self._started
            self.log.write({"step": self.step, "loss": loss, "lr": lr, "elapsed": elapsed, "ranks": ranks})
        if s.eval_every and self.step % s.eval_every == 0 and self.step < self.total_steps:
            metrics = self.evaluate()
            self.log.write({"step": self.step, "event": "eval", "metrics": metrics})
            self.best = self.outputs.keep_best(self.best, self.step, metrics)
        if s.save_every and self.step % s.save_every == 0:
            self.save()

    def _finish(self) -> dict[str, Any]:
        s, labels = self.settings, self.task.labels
        metrics = self.evaluate()
        self.log.write({"step": self.step, "event": "eval", "metrics": metrics, "final": True})
        self.best = self.outputs.keep_best(self.best, self.step, metrics)
        self.save()
        result = {
            "task": self.task.name,
            "method": s.method,
            "seed": s.seed,
            "steps": self.step,
            "skipped_nonfinite_steps": self.skipped,
            "trainable_parameters": self.adapted.trainable_parameters(),
            "peak_trainable_parameters": self.peak,
            "metrics": metrics,
            "best": self.best,
            "ranks": self.adapted.ranks(),
            "labels": list(labels) if labels is not None else None,
        }
        self.outputs.write_final(result)
        return result

    def _train_step(self) -> float | None:
        """One optimizer step; None when it was skipped for a non-finite loss or gradient. An fp16 step whose scaled
        gradients overflowed is tried again on the next batch with a smaller scale (devices.py)."""
        while True:
            loss, finite = self._attempt()
            if finite:
                self.precision.step(self.optimizer)
                self.scheduler.step()
                self._reallocated = self.adapted.after_step(self.step + 1)
                self.optimizer.zero_grad(set_to_none=True)
                return loss
            self.optimizer.zero_grad(set_to_none=True)
            self.adapted.skip_step()
            if not self.precision.retry_after_overflow(loss):
                return None

    def _attempt(self) -> tuple[float, bool]:
        """Forward and backward of a step's micro-batches, gradients clipped: (loss, every gradient finite), and
        whether to stop after this step (``stop_agreed``). One read from the device per step."""
        total = torch.zeros((), device=self.device)
        for _ in range(self.settings.grad_accum):
            batch = to_device(self.stream[self.micro], self.device)
            self.micro += 1
            with self.precision.autocast():
                loss = self.model(**batch).loss.float() / self.settings.grad_accum
            self.precision.backward(loss)
            total += loss.detach()
        if self.world > 1:
            average_gradients(self.params)
        self.precision.unscale(self.optimizer)
        clip = self.settings.max_grad_norm if self.settings.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        values = torch.stack([total, norm.float().to(total.device), total.new_full((), float(self.stop.requested))])
        if self.world > 1:
            # One small all-reduce: the loss logged is the global batch's, and a stop asked of any process (a signal
            # reaches each at its own moment) stops all of them after the same step.
            torch.distributed.all_reduce(values)
            values /= self.world
        loss_value, norm_value, stop = values.tolist()
        self.stop_agreed = stop > 0
        return loss_value, math.isfinite(loss_value) and math.isfinite(norm_value)


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train, evaluate and save one run (see the module doc); returns the final results."""
    return TrainingRun(settings).run()
