"""The ``dynlora`` command: train, compare, report, eval, export, merge.

Thin: flags come from the settings dataclasses (training/fields.py), the work from the training application.
User errors (bad data, flags, checkpoints, adapters) print one ``error:`` line and exit 2; ``--debug`` shows the
traceback. An interrupted training run exits 130 after saving, with the command that resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .io import new_directory, write_jsonl
from .targets import untrained_poolers
from .training.base_model import (
    adapter_base_bits,
    is_causal_lm,
    label_names,
    load_adapted,
    load_causal_lm,
    quiet_transformers,
)
from .training.compare import DEFAULT_METHODS, ComparePlan, plan_from, run_comparison, summary_table
from .training.data import task_spec
from .training.devices import resolve_device
from .training.errors import USER_ERRORS, Interrupted
from .training.fields import add_flags, from_args, from_mapping, merge, read_config_file
from .training.generation import GenerateSettings, generate
from .training.loop import TrainingRun
from .training.metrics import format_metrics, glue_metrics
from .training.report import write_report
from .training.run_facts import read_run_facts
from .training.settings import QUICK_STEPS, SETTINGS, TrainSettings, resumed_settings
from .training.tasks import ClassifyTask, eval_task, loss_metrics

COMPARE_MANAGED = ("task", "method", "seed", "resume")  # compare sets these per run


def _add_settings(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    add_flags(parser, [s for s in SETTINGS if not s.adapter and s.name not in exclude])
    add_flags(parser, [s for s in SETTINGS if s.adapter], "adapter (every method reads rank, alpha, dropout, targets)")
    parser.add_argument(
        "--config",
        help="YAML or JSON file of the same settings, keys named as the flags "
        "(lr, rank, schedule_warmup, ...); flags given here override it",
    )


def _file_settings(path: str | None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    if path is None:
        return {}
    return from_mapping(read_config_file(path) if data is None else data, SETTINGS, path)


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """Defaults < --config file < flags given on the command line; with --resume, the run's own saved settings
    (:func:`~dynlora.training.settings.resumed_settings`)."""
    return _train_settings(args)[0]


def _train_settings(args: argparse.Namespace) -> tuple[TrainSettings, list[str]]:
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
    return TrainSettings.from_settings(settings), []


def format_splits(metrics: dict[str, dict[str, float]]) -> str:
    return "\n".join(f"  {split}: {format_metrics(values)}" for split, values in metrics.items())


# --- commands ----------------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    settings, changes = _train_settings(args)
    quiet_transformers()
    run = TrainingRun(settings)
    say = print if run.writer else lambda *_: None  # under torchrun, one process speaks
    where = settings.train_file or settings.task
    if settings.resume:
        say(
            f"resuming {settings.output_dir} with its saved settings"
            + (f"; changed: {', '.join(changes)}" if changes else "")
        )
    trained = "adapter"
    summary = getattr(getattr(run.adapted, "model", None), "adapted_summary", lambda: "")()
    if "expert" in summary or "router" in summary:  # a mixture of experts: say what of it is adapted
        trained += f" on {summary}"
    if isinstance(run.task, ClassifyTask):
        poolers = [name.rsplit(".", 2)[-2] + ".pooler" for name in untrained_poolers(run.model)]
        trained += " + new task head" + "".join(f" + {p}, never trained in this checkpoint" for p in poolers)
    if run.task.prompt_format is not None:  # a language model: which one, trained for what, on what data
        objective = "instruct" if settings.train_file is None else "lm"
        where += f" ({settings.model or 'smollm2'}, {objective}, {run.task.prompt_format} data)"
    say(
        f"{settings.method} on {where}: {len(run.train_features)} training examples, {run.total_steps} steps, "
        f"{run.adapted.trainable_parameters():,} trainable parameters ({trained}) -> {settings.output_dir}"
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
    print(f"adapter: {Path(settings.output_dir) / 'adapter'}   log: {Path(settings.output_dir) / 'log.jsonl'}")
    return 0


EVAL_SETTINGS = (
    "task",
    "model",
    "data_dir",
    "dev_file",
    "text_col",
    "text_pair_col",
    "label_col",
    "regression",
    "max_length",
    "max_eval_samples",
    "batch_size",
    "device",
)


def cmd_eval(args: argparse.Namespace) -> int:
    given = from_args(args, SETTINGS)
    facts = read_run_facts(args.adapter)
    if "max_length" in facts:  # the run's own, unless --max-length says otherwise
        given.setdefault("max_length", facts["max_length"])
    if not given.get("task") and not given.get("dev_file"):
        raise ValueError("give --task (a GLUE task) or --dev-file (your own data) to evaluate on")
    defaults = TrainSettings()
    s = argparse.Namespace(**{f: given.get(f, getattr(defaults, f)) for f in EVAL_SETTINGS}, seed=0)
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
    if is_causal_lm(type(getattr(model, "model", model)).__name__) or args.adapter is None:
        outputs = None
    else:
        outputs = model.config.num_labels
        if s.dev_file and not (s.regression or outputs == 1):
            labels = label_names(model, args.adapter)
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


def cmd_export(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynlora", description="Dynamic LoRA fine-tuning for transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune on a GLUE task or your data; prints dev metrics",
        description="Fine-tune a sequence classifier with an adapter method. With no flags: Dynamic "
        f"LoRA on the embedded MiniLM-L6, GLUE SST-2, {QUICK_STEPS} steps.",
    )
    _add_settings(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare",
        help="run methods x tasks x seeds side by side (resumable); print mean ± std",
        description="Run every (task, method, seed), appending each finished run to "
        "OUTPUT_DIR/results.jsonl; start it again to resume an interrupted comparison. Training "
        "flags given here apply to every run; a --config plan file may also set per_task and "
        "per_method overrides.",
    )
    p.add_argument("--tasks", help="comma-separated GLUE tasks (default: sst2)")
    p.add_argument("--methods", help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each on an equal share of the CPU threads (default: 1)"
    )
    _add_settings(p, exclude=COMPARE_MANAGED)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="evaluate a saved adapter on a GLUE task's dev data or on your own dev file")
    p.add_argument("--adapter", help="adapter directory (dynlora or PEFT format); without it, a causal LM's base")
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="also write each dev example's prediction and gold label to FILE, one JSON object per line "
        "(split, the example's position in the dev set, label, prediction): for error analysis, or paired tests "
        "between adapters",
    )
    add_flags(p, [s for s in SETTINGS if not s.adapter and s.name in EVAL_SETTINGS])
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt, or answer it as a chat turn, streaming the text")
    p.add_argument("--prompt", help="the text to continue, or the user's message in --chat")
    p.add_argument(
        "--messages", help="a conversation to answer instead of --prompt: a JSON list of {role, content} turns"
    )
    p.add_argument("--system", help="a system message before the conversation (with --chat)")
    p.add_argument("--adapter", help="a trained adapter directory (dynlora or PEFT format) on its base model")
    p.add_argument("--model", help="base model, or a merged one (default: the adapter's base, else smollm2)")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render the prompt as a user turn with the model's chat template (default: if it has one and the "
        "adapter was trained on chat data or a GLUE instruction; a prompt/completion or text adapter continues)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above: sampling")
    add_flags(p, [s for s in SETTINGS if s.name == "device"])
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("report", help="PNG plots and a markdown summary of a run or a comparison directory")
    p.add_argument("directory", help="a run's --output-dir (log.jsonl) or a comparison's (results.jsonl)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="write a dynlora adapter as a standard PEFT LoRA adapter")
    p.add_argument("--adapter", required=True, help="dynlora adapter directory")
    p.add_argument("--peft", required=True, help="output directory of the PEFT adapter")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain transformers model")
    p.add_argument("--adapter", required=True, help="adapter directory (dynlora or PEFT format)")
    p.add_argument("--out", required=True, help="output directory of the merged model")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.set_defaults(func=cmd_merge)
    return parser


def _negative_values_attached(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` as ``--lr=-1e-3``: argparse reads a dash-led value other than a plain decimal as a flag."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-"):
            try:
                float(token)
            except ValueError:
                out.append(token)
                continue
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the command prints it: one line, no source excerpt (``--debug`` keeps Python's format)."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_negative_values_attached(argv))
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = _one_line_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    # Under torchrun every process meets the same error: the first one says it.
    say = (lambda text: print(text, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else (lambda _: None)
    try:
        return args.func(args)
    except Interrupted as e:
        say(f"\n{e}")
        return 130
    except KeyboardInterrupt:  # outside a training step (loading, eval, generate, merge), or a second Ctrl-C
        say("\ninterrupted: stopped at once; nothing is half-written (a training run keeps its last checkpoint)")
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        say(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
