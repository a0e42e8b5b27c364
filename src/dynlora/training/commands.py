"""What each ``dynlora`` command does, given its parsed flags: cli.py parses and dispatches here, importing this
module (and with it torch and transformers) only once the flags are read.

User errors raise the exceptions of errors.py (cli.py prints them as one ``error:`` line); an interrupted training
run raises :class:`~dynlora.training.errors.Interrupted` after saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..io import new_directory, write_jsonl
from ..model import DynamicLoRAModel
from ..targets import untrained_poolers
from .base_model import (
    adapter_base_bits,
    base_class,
    is_causal_lm,
    is_whole_model,
    label_names,
    load_adapted,
    load_causal_lm,
    quiet_transformers,
)
from .compare import ComparePlan, plan_from, run_comparison, summary_table
from .data import task_spec
from .devices import resolve_device
from .errors import Interrupted
from .evaluation import loss_metrics
from .fields import from_args, from_mapping, merge, read_config_file
from .generation import GenerateSettings, generate
from .loop import TrainingRun
from .metrics import format_metrics, glue_metrics
from .report import write_report
from .run_facts import read_run_facts
from .settings import LENGTH, SETTINGS, TrainSettings, resumed_settings
from .tasks import ClassifyTask, eval_task


def _file_settings(path: str | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    if path is None:
        return {}
    return from_mapping(read_config_file(path) if data is None else data, SETTINGS, path)


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """Defaults < --config file < flags given on the command line; with --resume, the run's own saved settings
    (:func:`~dynlora.training.settings.resumed_settings`)."""
    return _train_settings(args)[0]


def _train_settings(args: argparse.Namespace) -> tuple[TrainSettings, dict[str, tuple[Any, Any]]]:
    settings = merge(_file_settings(args.config), from_args(args, SETTINGS))
    if settings.get("resume"):
        if "output_dir" not in settings:
            raise ValueError("--resume needs --output-dir: the directory of the run to continue")
        saved = Path(settings["output_dir"]) / "config.json"
        if saved.is_file():
            return resumed_settings(json.loads(saved.read_text()), settings, settings["output_dir"])
    if "output_dir" not in settings:
        name = Path(settings.get("train_file") or settings.get("task", "sst2")).stem
        settings["output_dir"] = f"runs/{name}-{settings.get('method', 'dynamic')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return TrainSettings.from_settings(settings), {}


def format_splits(metrics: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"  {split}: {format_metrics(values)}" for split, values in metrics.items())


# --- commands ----------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    settings, changes = _train_settings(args)
    quiet_transformers()
    extend = bool(changes.keys() & LENGTH)  # a new --max-steps or --epochs: the run goes on to that length
    run = TrainingRun(settings, extend=extend)
    say = print if run.writer else lambda *_: None  # under torchrun, one process speaks
    where = settings.train_file or settings.task
    if settings.resume:
        changed = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changes.items())
        extended = f" (from here its schedules are those of a {run.total_steps}-step run)" if extend else ""
        say(
            f"resuming {settings.output_dir} with its saved settings"
            + (f"; changed: {changed}" if changed else "")
            + extended
        )
    trained = "every weight, no adapter" if settings.method == "full" else "adapter"
    summary = getattr(getattr(run.adapted, "model", None), "adapted_summary", lambda: "")()
    if "expert" in summary or "router" in summary:  # a mixture of experts: say what of it is adapted
        trained += f" on {summary}"
    if isinstance(run.task, ClassifyTask) and settings.method != "full":
        poolers = [name.rsplit(".", 2)[-2] + ".pooler" for name in untrained_poolers(run.model)]
        trained += " + new task head" + "".join(f" + {p}, never trained in this checkpoint" for p in poolers)
    if run.task.prompt_format is not None:  # a language model: which one, trained for what, on what data
        objective = "instruct" if settings.train_file is None else "lm"
        sized = f"batches of {run.settings.batch_size} x up to {run.settings.max_length} tokens"
        where += f" ({settings.model or 'smollm2'}, {objective}, {run.task.prompt_format} data, {sized})"
    count = run.adapted.trainable_parameters()
    params = f"{count:,} trainable parameters"
    model = getattr(run.adapted, "model", None)
    budget = model.budget_trainable_parameters() if isinstance(model, DynamicLoRAModel) else count
    if budget < count:  # an over-parameterised start
        params += f" at the start, pruned to at most {budget:,} while training"
    say(
        f"{settings.method} on {where}: {len(run.train_features)} training examples, {run.total_steps} steps, "
        f"{params} ({trained}) -> {settings.output_dir}"
    )
    try:
        result = run.run()
    except Interrupted:
        if run.writer:
            raise
        return 130  # the first process says how to resume
    if not run.writer:
        return 0
    if run.already_finished:
        print(f"{settings.output_dir} had already finished; nothing was trained or written. Its results:")
    print(f"dev metrics after {result['steps']} steps:")
    print(format_splits(result["metrics"]))
    if result["ranks"]:
        values = list(result["ranks"].values())
        print(f"final ranks: min {min(values)}, max {max(values)}, total {sum(values)} over {len(values)} layers")
    if settings.method == "dynamic" and settings.adapter.start_ratio > 1:  # an over-parameterised start
        final, peak = result["trainable_parameters"], result["peak_trainable_parameters"]
        print(f"trainable parameters: {final:,}, pruned from {peak:,}")
    print(f"adapter: {Path(settings.output_dir) / 'adapter'}   log: {Path(settings.output_dir) / 'log.jsonl'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    given = from_args(args, SETTINGS)
    facts = read_run_facts(args.adapter)
    if "max_length" in facts:  # the run's own, unless --max-length says otherwise
        given.setdefault("max_length", facts["max_length"])
    if not given.get("task") and not given.get("dev_file"):
        raise ValueError("give --task (a GLUE task) or --dev-file (your own data) to evaluate on")
    s = TrainSettings.from_settings(given)  # the flags eval has, over the defaults
    if args.predictions and s.max_eval_samples:
        raise ValueError("--predictions writes one line per dev example in the file's order; drop --max-eval-samples")
    quiet_transformers()
    outputs = task_spec(s.task).num_labels if not s.dev_file else None
    if args.adapter is None:  # the base language model itself: the floor an adapter should rise from
        base = load_causal_lm(s.model)
        model, tok = base.model, base.tokenizer
    else:
        device = resolve_device(s.device)
        model, tok = load_adapted(args.adapter, s.model, outputs, device=device)
    labels = None
    if is_causal_lm(base_class(model)) or args.adapter is None:
        outputs = None
    else:
        outputs = model.config.num_labels
        if s.dev_file and not (s.regression or outputs == 1):
            labels = label_names(model, args.adapter)
    s = s.sized(outputs is None, getattr(model.config, "max_position_embeddings", None))  # as training sizes them
    if not getattr(model, "is_quantized", False) and not adapter_base_bits(args.adapter or ""):
        model.to(resolve_device(s.device))
    task = eval_task(s, outputs, labels)
    results, rows = {}, []
    for split, eval_set in task.eval_sets(tok, s).items():
        if args.predictions and hasattr(task, "losses"):  # a language model: each block's loss and token count
            blocks = task.losses(model, tok, eval_set, s.batch_size)
            results[split] = loss_metrics(sum(b["loss_sum"] for b in blocks), sum(b["tokens"] for b in blocks))
            rows += [{"split": split, "index": i, **block} for i, block in enumerate(blocks)]
        elif args.predictions:
            predictions, gold = task.predict(model, tok, eval_set, s.batch_size)
            results[split] = glue_metrics(task.metric_task, predictions, gold)
            rows += [
                {"split": split, "index": i, "label": g, "prediction": p}
                for i, (p, g) in enumerate(zip(predictions, gold, strict=True))
            ]
        else:
            results[split] = task.evaluate(model, tok, eval_set, s.batch_size)
    bits = adapter_base_bits(args.adapter) if args.adapter else None
    on = f" (on the {bits}-bit base it was trained on)" if bits else ""
    print(f"{task.name} with {args.adapter or s.model or 'smollm2'}{on}:")
    print(format_splits(results))
    if args.predictions:
        write_jsonl(args.predictions, rows)
        print(f"predictions: {args.predictions} ({len(rows)} lines)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    device = from_args(args, SETTINGS).get("device", "auto")
    fields = ("prompt", "messages", "system", "adapter", "model", "chat", "max_new_tokens", "temperature")
    generate(GenerateSettings(**{f: getattr(args, f) for f in fields}, device=device))
    return 0


def refuse_whole_model(adapter: str, verb: str) -> None:
    """A whole model (a fully fine-tuned run's) has no adapter to merge or export: say how to use it instead."""
    if is_whole_model(adapter):
        raise ValueError(
            f"{adapter} is a whole model (trained with --method full, or merged), not an adapter: there is nothing to "
            f"{verb}; it loads as it is, with from_pretrained({adapter!r}), and serves as any transformers model"
        )


def cmd_export(args: argparse.Namespace) -> int:
    refuse_whole_model(args.adapter, "export")
    quiet_transformers()
    model, _ = load_adapted(args.adapter, args.model, full_precision=True)
    say_full_precision(args.adapter, "exported for the full-precision base")
    if not hasattr(model, "export_peft"):
        raise ValueError(f"{args.adapter} is already a PEFT adapter; nothing to export")
    with new_directory(args.peft) as tmp:
        model.export_peft(tmp)
    print(f"wrote a PEFT LoRA adapter to {args.peft} (load it with peft.PeftModel.from_pretrained(base, dir))")
    return 0


def say_full_precision(adapter: str, what: str) -> None:
    """A QLoRA adapter is merged or exported for the full-precision base: say so, as its outputs move a little."""
    bits = adapter_base_bits(adapter)
    if bits:
        print(
            f"note: {adapter} was trained on a {bits}-bit base (QLoRA); it is {what}, whose outputs differ a little "
            "from the quantised one's",
            file=sys.stderr,
        )


def cmd_merge(args: argparse.Namespace) -> int:
    refuse_whole_model(args.adapter, "merge")
    quiet_transformers()
    model, tok = load_adapted(args.adapter, args.model, full_precision=True)
    say_full_precision(args.adapter, "merged into the full-precision base")
    merged = model.merge_and_unload()
    with new_directory(args.out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"wrote the merged model to {args.out} (a plain transformers model: from_pretrained({args.out!r}))")
    return 0


def compare_plan(args: argparse.Namespace) -> ComparePlan:
    """The plan of ``dynlora compare``: a --config plan file, with the command's flags over its ``base``."""
    plan_file = read_config_file(args.config) if args.config else {}
    flags = from_args(args, SETTINGS)
    return plan_from(plan_file, args.config or "the command line", flags, args.tasks, args.methods, args.seeds)


def cmd_compare(args: argparse.Namespace) -> int:
    plan = compare_plan(args)
    plan.check()  # every run's settings, before hours of runs
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    try:
        results = run_comparison(plan, jobs=args.jobs)
    except (KeyboardInterrupt, Interrupted):  # the running training(s) saved checkpoints; say how to go on
        print(
            f"\ninterrupted; finished runs are in {plan.output_dir}/results.jsonl and the running ones saved "
            "checkpoints. Resume with the same command.",
            file=sys.stderr,
        )
        return 130
    table = summary_table(results, plan.tasks, plan.methods)
    (Path(plan.output_dir) / "summary.md").write_text(table + "\n")
    print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.directory)
    images = ", ".join(sorted(p.name for p in path.parent.glob("*.png")))
    print(f"wrote {path} with {images}")
    return 0
