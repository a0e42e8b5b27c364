"""The ``dynlora`` command: train, compare, report, eval, export, merge.

User errors (bad data, flags, checkpoints, adapters) print one ``error:`` line and exit 2; ``--debug`` shows the
traceback. An interrupted training run exits 130 after saving, with the command that resumes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import typing
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError
from .data import DataError
from .io import new_directory

QUICK_STEPS = 300  # `dynlora train` with neither --epochs nor --max-steps: a few minutes on a laptop CPU

# (flag, TrainConfig field, type, help). Adapter fields live in TrainConfig.adapter.
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--task", "task", str, "GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"),
    ("--model", "model", str, "local model directory or hub id (default: the embedded MiniLM-L6)"),
    ("--method", "method", str, "dynamic | lora | peft-lora | peft-adalora (equal adapter budget)"),
    ("--data-dir", "data_dir", str, "GLUE folder (default: $DYNLORA_GLUE_DIR, else ../shared/data/glue)"),
    ("--train-file", "train_file", str, "your own training data, .csv/.tsv/.jsonl (instead of --task)"),
    ("--dev-file", "dev_file", str, "your own evaluation data, same format as --train-file"),
    ("--text-col", "text_col", str, "column of the text in --train-file/--dev-file"),
    ("--text-pair-col", "text_pair_col", str, "column of the second text of a pair, if any"),
    ("--label-col", "label_col", str, "column of the label"),
    ("--max-length", "max_length", int, "truncate inputs to this many tokens (batches pad to their longest)"),
    ("--max-train-samples", "max_train_samples", int, "train on a random subset of this size"),
    ("--max-eval-samples", "max_eval_samples", int, "evaluate on a random subset of this size"),
    ("--batch-size", "batch_size", int, "examples per micro-batch (per process)"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--epochs", "epochs", float, "training epochs (used when --max-steps is 0)"),
    ("--max-steps", "max_steps", int, f"optimizer steps; overrides --epochs (default {QUICK_STEPS} unless --epochs)"),
    ("--lr", "lr", float, "peak learning rate of AdamW"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay"),
    ("--warmup-ratio", "warmup_ratio", float, "fraction of steps of linear learning-rate warm-up"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (0: off)"),
    ("--seed", "seed", int, "seed of data order, initialisation and dropout"),
    ("--eval-every", "eval_every", int, "evaluate every N steps (0: only at the end)"),
    ("--save-every", "save_every", int, "checkpoint every N steps (0: only at the end or on interrupt)"),
    ("--log-every", "log_every", int, "write a loss record to log.jsonl every N steps"),
    ("--max-nonfinite-steps", "max_nonfinite_steps", int, "stop after this many non-finite steps in a row"),
    ("--output-dir", "output_dir", str, "run directory (default: runs/<task>-<method>-<time>)"),
]
ADAPTER_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--rank", "rank", int, "LoRA rank; also fixes the budget of every method"),
    ("--alpha", "alpha", float, "LoRA alpha (scale alpha / rank)"),
    ("--dropout", "dropout", float, "dropout on the adapter path"),
    ("--target-modules", "target_modules", str, "comma-separated module names, or a regex prefixed with re:"),
    ("--max-rank", "max_rank", int, "largest rank a layer may grow to (dynamic; default 2 x rank)"),
    ("--min-rank", "min_rank", int, "smallest rank a layer may shrink to (dynamic)"),
    ("--importance", "importance", str, "sensitivity | gradient | update_norm (dynamic)"),
    ("--temperature", "temperature", float, "allocation sharpness: shares ~ score^(1/T) (dynamic)"),
    ("--max-rank-change", "max_rank_change", int, "most a layer's rank moves per re-allocation (dynamic)"),
    ("--schedule-warmup", "warmup", float, "first re-allocation: fraction of the run, or a step count if > 1"),
    ("--schedule-interval", "interval", float, "re-allocation interval: fraction of the run, or steps if > 1"),
    ("--schedule-final", "final", float, "last re-allocation: fraction of the run, or a step count if > 1"),
    ("--input-adaptive", "input_adaptive", str, "mergeable | per_example | none (dynamic)"),
    ("--input-norm-strength", "input_norm_strength", float, "mergeable: input scale (rms_ref/rms)^s, s in (0, 1]"),
    ("--init", "init", str, "gradient (A along the loss gradient's top directions) | lora (A random) (dynamic)"),
]


def _defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    from .methods import AdapterSettings
    from .train import TrainConfig

    cfg = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    adapter = {f.name: f.default for f in dataclasses.fields(AdapterSettings) if f.default is not dataclasses.MISSING}
    return cfg, adapter


def _add_train_flags(p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    cfg, adapter = _defaults()
    # SUPPRESS: a flag not given leaves no attribute, so a --config file's value is not overwritten by a default.
    for flag, name, kind, text in TRAIN_FLAGS:
        if name in exclude:
            continue
        shown = "" if name in ("max_steps", "output_dir", "model", "data_dir") else f" (default: {cfg.get(name)})"
        p.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=text + shown)
    group = p.add_argument_group("adapter")
    for flag, name, kind, text in ADAPTER_FLAGS:
        default = adapter.get(name)
        group.add_argument(flag, dest=f"adapter.{name}", type=kind, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=f"{text} (default: {default})")  # fmt: skip
    p.add_argument("--regression", action="store_true", default=argparse.SUPPRESS, help="labels are numbers")
    if "resume" not in exclude:
        p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS, help="continue --output-dir's run")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="no progress bar")  # fmt: skip
    p.add_argument("--config", help="YAML or JSON file of the same settings (flags given here override it)")


def _read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ValueError(f"config file {path} cannot be parsed: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    return data


def _parse_target_modules(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def _flag_settings(args: argparse.Namespace, file_settings: dict[str, Any]) -> tuple[dict, dict]:
    """(settings, adapter settings): a config file's, then the flags given on the command line over them."""
    settings = dict(file_settings)
    adapter: dict[str, Any] = dict(settings.pop("adapter", {}) or {})
    for key, value in vars(args).items():
        if key.startswith("adapter."):
            adapter[key.split(".", 1)[1]] = value
        elif key not in ("command", "config", "debug", "func", "tasks", "methods", "seeds", "jobs"):
            settings[key] = value
    return settings, adapter


def _normalise_adapter(adapter: dict[str, Any]) -> dict[str, Any]:
    from .methods import AdapterSettings

    unknown = sorted(set(adapter) - {f.name for f in dataclasses.fields(AdapterSettings)})
    if unknown:
        raise ValueError(f"unknown adapter setting(s) {', '.join(unknown)}; see dynlora train --help")
    adapter = _typed(adapter, AdapterSettings)
    if "target_modules" in adapter:
        adapter["target_modules"] = _parse_target_modules(adapter["target_modules"])
    if str(adapter.get("input_adaptive", "")).lower() == "none":
        adapter["input_adaptive"] = None
    for key in ("warmup", "interval", "final"):  # values above 1 are step counts; 1.0 is the whole run
        if key in adapter and isinstance(adapter[key], float) and adapter[key] > 1:
            adapter[key] = int(adapter[key])
    return adapter


def _typed(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """Numbers (and booleans) from a config file as the dataclass declares them: YAML reads ``lr: 1e-3`` as a
    string."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if hints.get(key) is bool and not isinstance(value, bool):  # a string such as "no" would be truthy
            raise ValueError(f"setting {key} must be true or false, got {value!r}")
        kinds = {t for t in typing.get_args(hints.get(key)) or (hints.get(key),) if t in (int, float)}
        if not kinds or value is None:
            continue
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or (kinds == {int} and not number.is_integer()):
            kind = "an integer" if kinds == {int} else "a number"
            raise ValueError(f"setting {key} must be {kind}, got {value!r}")
        # float | int fields (schedule points): an integral value stays a step count, as the flags parse it
        out[key] = int(number) if kinds == {int} or (int in kinds and isinstance(value, int)) else number
    return out


def _checked(settings: dict[str, Any]) -> dict[str, Any]:
    """Training settings with unknown names refused and numbers typed (one error line each)."""
    from .train import TrainConfig

    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; see dynlora train --help")
    return _typed(settings, TrainConfig)


def build_train_config(args: argparse.Namespace) -> Any:
    """Defaults < --config file < flags given on the command line."""
    settings, adapter = _flag_settings(args, _read_config_file(args.config) if args.config else {})
    if "output_dir" not in settings:
        name = Path(settings.get("train_file") or settings.get("task", "sst2")).stem
        settings["output_dir"] = f"runs/{name}-{settings.get('method', 'dynamic')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return _train_config({**settings, "adapter": adapter})


def _train_config(settings: dict[str, Any]) -> Any:
    """A TrainConfig from plain settings (a nested ``adapter`` dict included): names checked, numbers typed,
    and the quick default length when neither --epochs nor --max-steps is given."""
    from .train import TrainConfig

    settings = dict(settings)
    adapter = _normalise_adapter(settings.pop("adapter", None) or {})
    if "max_steps" not in settings and "epochs" not in settings:
        settings["max_steps"] = QUICK_STEPS
    return TrainConfig(**_checked(settings), adapter=adapter)


def format_splits(metrics: dict[str, dict[str, float]]) -> str:
    from .metrics import format_metrics

    return "\n".join(f"  {split}: {format_metrics(values)}" for split, values in metrics.items())


# --- commands ----------------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    """A task head is always new when fine-tuning: transformers' per-load report of it is noise here."""
    import warnings

    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer

    cfg = build_train_config(args)
    _quiet_transformers()
    trainer = Trainer(cfg)
    print(f"{cfg.method} on {cfg.task if not cfg.train_file else cfg.train_file}: "
          f"{len(trainer.train_features)} training examples, {trainer.total_steps} steps, "
          f"{trainer.adapted.trainable_parameters():,} trainable parameters (adapter + new task head) "
          f"-> {cfg.output_dir}")  # fmt: skip
    result = trainer.run()
    print(f"dev metrics after {result['steps']} steps:")
    print(format_splits(result["metrics"]))
    if result["ranks"]:
        values = list(result["ranks"].values())
        print(f"final ranks: min {min(values)}, max {max(values)}, total {sum(values)} over {len(values)} layers")
    print(f"adapter: {Path(cfg.output_dir) / 'adapter'}   log: {Path(cfg.output_dir) / 'log.jsonl'}")
    return 0


def _load_adapted(adapter: str, model: str | None, num_labels: int | None = None):
    """(model with the adapter, tokenizer) for a dynlora or PEFT adapter directory."""
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .model import DynamicLoRAModel, read_adapter_meta
    from .models import resolve_model_path

    where = Path(adapter)
    if (where / "adapter_config.json").is_file() and not (where / "dynlora_config.json").is_file():
        from peft import PeftModel

        base_name = model or json.loads((where / "adapter_config.json").read_text()).get("base_model_name_or_path")
        path = resolve_model_path(base_name)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels or 2)
        return PeftModel.from_pretrained(base, str(where)), AutoTokenizer.from_pretrained(path)
    meta = read_adapter_meta(where)
    path = resolve_model_path(model or meta["base_model"].get("name_or_path"))
    heads = {}
    from safetensors import safe_open

    with safe_open(str(where / "dynlora_model.safetensors"), framework="pt") as f:
        for name in meta["modules_to_save"]:
            if f"{name}.weight" in f.keys():  # noqa: SIM118 - safe_open handles support keys(), not `in`
                heads[name] = f.get_slice(f"{name}.weight").get_shape()[0]
    labels = num_labels or next(iter(heads.values()), 2)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels)
    return DynamicLoRAModel.from_pretrained(base, where), AutoTokenizer.from_pretrained(path)


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_glue, task_spec, tokenize
    from .train import evaluate_features

    spec = task_spec(args.task)
    model, tok = _load_adapted(args.adapter, args.model, spec.num_labels)
    results = {
        split: evaluate_features(
            model,
            tokenize(examples, tok, args.max_length),
            spec.name,
            spec.is_regression,
            args.batch_size,
            tok.pad_token_id,
        )  # fmt: skip
        for split, examples in load_glue(spec.name, args.data_dir).items()
        if split != "train"
    }
    print(f"{spec.name} with {args.adapter}:")
    print(format_splits(results))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    model, _ = _load_adapted(args.adapter, args.model)
    if not hasattr(model, "export_peft"):
        raise ValueError(f"{args.adapter} is already a PEFT adapter; nothing to export")
    with new_directory(args.peft) as tmp:
        model.export_peft(tmp)
    print(f"wrote a PEFT LoRA adapter to {args.peft} (load it with peft.PeftModel.from_pretrained(base, dir))")
    return 0


def _csv(value: str | list | None, kind: type = str) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(",")
    return [kind(str(v).strip()) for v in items if str(v).strip()]


def _train_one(settings: dict[str, Any]) -> dict[str, Any]:
    """One run of a comparison (module level: --jobs sends it to worker processes)."""
    from .train import Trainer

    _quiet_transformers()
    return Trainer(_train_config(settings)).run()


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import ComparePlan, run_comparison, summary_table
    from .data import task_spec
    from .methods import METHODS
    from .train import Interrupted

    plan_file = _read_config_file(args.config) if args.config else {}
    plan_keys = {"tasks", "methods", "seeds", "output_dir", "base", "per_task", "per_method"}
    unknown = sorted(set(plan_file) - plan_keys)
    if unknown:
        allowed = ", ".join(sorted(plan_keys))
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {args.config}; allowed: {allowed}")
    base, adapter = _flag_settings(args, plan_file.get("base", {}) or {})
    output_dir = base.pop("output_dir", None) or plan_file.get("output_dir") or "runs/compare"
    if adapter:
        base["adapter"] = adapter
    plan = ComparePlan(
        tasks=[task_spec(t).name for t in _csv(args.tasks or plan_file.get("tasks") or "sst2")],
        methods=_csv(args.methods or plan_file.get("methods") or "dynamic,lora,peft-lora,peft-adalora"),
        seeds=_csv(args.seeds if args.seeds is not None else plan_file.get("seeds", "0,1,2"), int),
        output_dir=output_dir, base=base, per_task=plan_file.get("per_task") or {},
        per_method=plan_file.get("per_method") or {},
    )  # fmt: skip
    for task in plan.tasks:  # fail before hours of runs, not in the middle
        for method in plan.methods:
            settings = plan.settings(task, method, plan.seeds[0])
            if settings["method"] not in METHODS:
                raise ValueError(
                    f"unknown method {method!r}; choose from {', '.join(METHODS)}, or name a variant "
                    f"in the plan file: per_method: {{{method}: {{method: dynamic, ...}}}}"
                )
            _train_config(settings)
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    try:
        results = run_comparison(plan, _train_one, jobs=args.jobs)
    except (KeyboardInterrupt, Interrupted):  # the running training(s) saved checkpoints; say how to go on
        print(f"\ninterrupted; finished runs are in {plan.output_dir}/results.jsonl and the running ones saved "
              "checkpoints. Resume with the same command.", file=sys.stderr)  # fmt: skip
        return 130
    table = summary_table(results, plan.tasks, plan.methods)
    (Path(plan.output_dir) / "summary.md").write_text(table + "\n")
    print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.directory)
    images = ", ".join(sorted(p.name for p in path.parent.glob("*.png")))
    print(f"wrote {path} with {images}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    model, tok = _load_adapted(args.adapter, args.model)
    merged = model.merge_and_unload()
    with new_directory(args.out) as tmp:
        merged.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"wrote the merged model to {args.out} (a plain transformers model: from_pretrained({args.out!r}))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynlora", description="Dynamic LoRA fine-tuning for transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune on a GLUE task or your data; prints dev metrics",
                       description="Fine-tune a sequence classifier with an adapter method. With no flags: Dynamic "
                       f"LoRA on the embedded MiniLM-L6, GLUE SST-2, {QUICK_STEPS} steps.")  # fmt: skip
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="run methods x tasks x seeds side by side (resumable); print mean ± std",
                       description="Run every (task, method, seed), appending each finished run to "
                       "OUTPUT_DIR/results.jsonl; start it again to resume an interrupted comparison. Training "
                       "flags given here apply to every run; a --config plan file may also set per_task and "
                       "per_method overrides.")  # fmt: skip
    p.add_argument("--tasks", help="comma-separated GLUE tasks (default: sst2)")
    p.add_argument("--methods", help="comma-separated methods (default: dynamic,lora,peft-lora,peft-adalora)")
    p.add_argument("--seeds", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each on an equal share of the CPU threads (default: 1)")  # fmt: skip
    _add_train_flags(p, exclude=("task", "method", "seed", "resume"))
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("eval", help="evaluate a saved adapter on a GLUE task's dev data")
    p.add_argument("--adapter", required=True, help="adapter directory (dynlora or PEFT format)")
    p.add_argument("--task", required=True, help="GLUE task")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--data-dir", help="GLUE folder (default: $DYNLORA_GLUE_DIR, else ../shared/data/glue)")
    p.add_argument("--max-length", type=int, default=128, help="truncate inputs to this many tokens (default: 128)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size (default: 64)")
    p.set_defaults(func=cmd_eval)

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


# OSError: a full disk or a denied permission is the environment, not a bug: one line (--debug shows more)
USER_ERRORS = (DataError, CheckpointError, OSError, ValueError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .train import Interrupted

    try:
        return args.func(args)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
