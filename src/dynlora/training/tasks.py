"""What a run trains for, and how it is scored: the three objectives of ``--objective``.

- ``classify``: a classification (or regression) head on a GLUE task or a labelled CSV/TSV/JSONL file; the task's
  official GLUE metric (accuracy, or Pearson/Spearman, for the user's files).
- ``lm``: a causal language model on prompt/completion or chat JSONL, or plain text (data/lm.py); scored by the
  loss of the tokens the model should write and its perplexity.
- ``instruct``: a GLUE task posed to a chat model (data/instruct.py); scored by the likeliest answer word, with the
  task's official metric.

``auto`` (the default) picks ``lm`` for a language-model file, ``instruct`` for a GLUE task on a causal language
model, and ``classify`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..shipped_models import resolve_model_path
from .answers import choose_answers
from .base_model import BaseModel, center_regression_head, is_causal_lm, load_base, load_causal_lm
from .data import TaskData, load_task_data, task_spec
from .data.glue import Example, TaskSpec, load_glue
from .data.instruct import conversation, fitted, instruction
from .data.lm import chat_features, has_chat_template, lm_features, lm_format
from .data.loader import tokenize
from .data.splits import command_glue_dir, subset
from .errors import DataError
from .evaluation import language_metrics, predict, token_losses
from .metrics import glue_metrics, main_metric_name
from .settings import TrainSettings


class Task(Protocol):
    name: str  # what results.json calls the task: a GLUE task or the training file
    labels: tuple[str, ...] | None  # class names in id order (classifiers)
    main_metric: str  # what the "main" score of an evaluation is, in words
    prompt_format: str | None  # how inputs reach a language model: chat, completion, text, documents; None: a head

    def load_model(self, model: str | None, **loading: Any) -> BaseModel:
        """The base model and tokenizer; ``loading``: from_pretrained's arguments for a quantised base."""
        ...

    def train_features(self, base: BaseModel, settings: TrainSettings) -> list[dict]:
        """Tokenised training examples (a task may also set up ``base``'s head from them)."""
        ...

    def eval_sets(self, tokenizer: Any, settings: TrainSettings) -> dict[str, list]:
        """What :meth:`evaluate` scores, by split."""
        ...

    def evaluate(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> dict[str, float]: ...

    # Tasks scored from one answer per example (classify, instruct; not lm) also have ``metric_task`` (the GLUE task
    # whose metric scores them) and ``predict(model, tokenizer, eval_set, batch_size)``: each example's prediction
    # (class id, or score for a regression) and its gold label.


@dataclass
class ClassifyTask:
    data: TaskData
    name: str
    prompt_format = None

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.data.labels

    @property
    def main_metric(self) -> str:
        return main_metric_name(self.data.metric_task)

    def load_model(self, model: str | None, **loading: Any) -> BaseModel:
        base = load_base(model, self.data.num_labels, self.data.regression, **loading)
        if self.labels is not None:  # the names travel with the head: adapter, merged model, results
            base.model.config.id2label = dict(enumerate(self.labels))
            base.model.config.label2id = {name: i for i, name in enumerate(self.labels)}
        return base

    def train_features(self, base: BaseModel, settings: TrainSettings) -> list[dict]:
        train = subset(self.data.splits["train"], settings.max_train_samples, settings.seed)
        if self.data.regression:
            center_regression_head(base.model, base.fresh, sum(e.label for e in train) / len(train))
        return tokenize(train, base.tokenizer, settings.max_length)

    def eval_sets(self, tokenizer: Any, settings: TrainSettings) -> dict[str, list]:
        limit, seed, length = settings.max_eval_samples, settings.seed, settings.max_length
        splits = self.data.splits.items()
        return {name: tokenize(subset(x, limit, seed), tokenizer, length) for name, x in splits if name != "train"}

    @property
    def metric_task(self) -> str:
        return self.data.metric_task

    def predict(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> tuple[list, list]:
        return predict(model, eval_set, self.data.regression, batch_size, tokenizer.pad_token_id)

    def evaluate(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> dict[str, float]:
        return glue_metrics(self.metric_task, *self.predict(model, tokenizer, eval_set, batch_size))


@dataclass
class LanguageTask:
    train_file: str
    dev_file: str
    labels = None
    main_metric = "negative loss per target token"

    @property
    def name(self) -> str:
        return self.train_file

    @property
    def prompt_format(self) -> str | None:
        return lm_format(self.train_file)

    def load_model(self, model: str | None, **loading: Any) -> BaseModel:
        base = load_causal_lm(model, **loading)
        if "chat" in (lm_format(self.train_file), lm_format(self.dev_file)) and not has_chat_template(base.tokenizer):
            raise DataError(
                f"{self.train_file} is chat data, and the model {model or 'smollm2'} has no chat template to render "
                "it; use prompt/completion JSONL, or a chat model"
            )
        return base

    def train_features(self, base: BaseModel, settings: TrainSettings) -> list[dict]:
        features = lm_features(self.train_file, base.tokenizer, settings.max_length)
        return subset(features, settings.max_train_samples, settings.seed)

    def eval_sets(self, tokenizer: Any, settings: TrainSettings) -> dict[str, list]:
        features = lm_features(self.dev_file, tokenizer, settings.max_length)
        return {"validation": subset(features, settings.max_eval_samples, settings.seed)}

    def evaluate(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> dict[str, float]:
        return language_metrics(model, eval_set, batch_size, tokenizer.pad_token_id)

    def losses(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> list[dict]:
        """Per block of ``eval_set``: its document (line of a documents file; 0 otherwise), summed loss, tokens."""
        sums, counts = token_losses(model, eval_set, batch_size, tokenizer.pad_token_id)
        return [
            {"document": f.get("document", 0), "loss_sum": loss, "tokens": n}
            for f, loss, n in zip(eval_set, sums.tolist(), counts.tolist(), strict=True)
        ]


@dataclass
class InstructTask:
    spec: TaskSpec
    splits: dict[str, list[Example]]
    prompt_format = "chat"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> tuple[str, ...]:
        return instruction(self.spec).answers

    @property
    def main_metric(self) -> str:
        return main_metric_name(self.spec.name)

    def load_model(self, model: str | None, **loading: Any) -> BaseModel:
        base = load_causal_lm(model, **loading)
        if not has_chat_template(base.tokenizer):
            raise DataError(
                f"the model {model or 'smollm2'} has no chat template: a GLUE task is posed to a chat model as an "
                "instruction; use --objective classify for a classification head"
            )
        return base

    def train_features(self, base: BaseModel, settings: TrainSettings) -> list[dict]:
        train = subset(self.splits["train"], settings.max_train_samples, settings.seed)
        length, tok = settings.max_length, base.tokenizer
        return [
            chat_features(conversation(self.spec, fitted(self.spec, e, tok, length)), tok, length, f"{self.name} #{i}")
            for i, e in enumerate(train, start=1)
        ]

    def eval_sets(self, tokenizer: Any, settings: TrainSettings) -> dict[str, list]:
        limit, seed, length = settings.max_eval_samples, settings.seed, settings.max_length
        return {
            name: [fitted(self.spec, e, tokenizer, length) for e in subset(x, limit, seed)]
            for name, x in self.splits.items()
            if name != "train"
        }

    @property
    def metric_task(self) -> str:
        return self.spec.name

    def predict(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> tuple[list, list]:
        return choose_answers(model, tokenizer, self.spec, eval_set, batch_size), [int(e.label) for e in eval_set]

    def evaluate(self, model: nn.Module, tokenizer: Any, eval_set: list, batch_size: int) -> dict[str, float]:
        return glue_metrics(self.metric_task, *self.predict(model, tokenizer, eval_set, batch_size))


def _model_is_causal_lm(model: str | None) -> bool:
    if model is None:
        return False  # the encoder default
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(model))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a model from {model!r}: {str(e).splitlines()[0]}") from e
    architectures = getattr(config, "architectures", None) or []
    return bool(architectures) and all(is_causal_lm(a) for a in architectures)


def load_task(settings: TrainSettings) -> Task:
    """The task ``settings`` describe (see the module doc for how ``auto`` chooses)."""
    if settings.dev_file and not settings.train_file:  # dynlora eval scores a dev file alone (eval_task)
        raise DataError("--dev-file needs --train-file: together they replace the GLUE task's data")
    objective = settings.objective
    if objective == "auto":
        if settings.train_file:
            objective = "lm" if lm_format(settings.train_file, settings.label_col) else "classify"
        else:
            objective = "instruct" if _model_is_causal_lm(settings.model) else "classify"
    if objective == "lm":
        if not settings.train_file or lm_format(settings.train_file) is None:
            raise DataError(
                "--objective lm needs --train-file (and --dev-file) of prompt/completion, chat or text JSONL, or plain "
                ".txt"
            )
        dev = Path(settings.dev_file) if settings.dev_file else None
        if dev is not None and dev.is_file() and not dev.read_text(encoding="utf-8", errors="replace").strip():
            raise DataError(f"--dev-file {dev} is empty: give it examples in the format of --train-file")
        if lm_format(settings.dev_file) is None:
            raise DataError(f"--dev-file {settings.dev_file} is not language-model data like --train-file")
        return LanguageTask(settings.train_file, settings.dev_file)
    if objective == "instruct":
        if settings.train_file:
            raise DataError(
                "--objective instruct poses a GLUE --task to a chat model; for your own data use "
                "prompt/completion or chat JSONL (--objective lm)"
            )
        spec = task_spec(settings.task)
        instruction(spec)  # a regression task has no answer words: say so before loading anything
        return InstructTask(spec, load_glue(spec.name, command_glue_dir(settings.data_dir)))
    data = load_task_data(settings)
    return ClassifyTask(data, settings.train_file or task_spec(settings.task).name)


def eval_task(settings: TrainSettings, num_outputs: int | None, labels: tuple[str, ...] | None) -> Task:
    """The task ``dynlora eval`` scores an adapter on: ``settings``' task or dev file, for a saved model with
    ``num_outputs`` head outputs and class names ``labels`` (None for a language model)."""
    if num_outputs is None:  # a causal language model
        if settings.dev_file:
            return LanguageTask(settings.dev_file, settings.dev_file)
        spec = task_spec(settings.task)
        return InstructTask(spec, load_glue(spec.name, command_glue_dir(settings.data_dir)))
    if settings.dev_file:
        from .data.custom import load_custom

        regression = settings.regression or num_outputs == 1
        cols = (settings.text_col, settings.text_pair_col, settings.label_col)
        dev, _ = load_custom(settings.dev_file, *cols, labels=None if regression else labels, regression=regression)
        data = TaskData(
            {"validation": dev}, None if regression else labels, regression, "stsb" if regression else "sst2"
        )
        return ClassifyTask(data, str(Path(settings.dev_file)))
    spec = task_spec(settings.task)
    data = TaskData(
        load_glue(spec.name, command_glue_dir(settings.data_dir)), spec.labels, spec.is_regression, spec.name
    )
    return ClassifyTask(data, spec.name)
