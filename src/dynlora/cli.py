"""The ``dynlora`` command: train, compare, report, eval, export, merge.

Thin: flags come from the settings dataclasses (training/fields.py), the work from the training application's
commands (training/commands.py), imported only once the flags are read: ``--help`` and flag errors answer at once.
User errors (bad data, flags, checkpoints, adapters) print one ``error:`` line and exit 2; ``--debug`` shows the
traceback. An interrupted training run exits 130 after saving, with the command that resumes it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator

from .training.errors import USER_ERRORS, Interrupted
from .training.fields import add_flags
from .training.settings import DEFAULT_METHODS, QUICK_STEPS, SETTINGS

COMPARE_MANAGED = ("task", "method", "seed", "resume")  # compare sets these per run


def _add_settings(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    add_flags(parser, [s for s in SETTINGS if not s.adapter and s.name not in exclude])
    add_flags(parser, [s for s in SETTINGS if s.adapter], "adapter (every method reads rank, alpha, dropout, targets)")
    parser.add_argument(
        "--config",
        help="YAML or JSON file of the same settings, keys named as the flags "
        "(lr, rank, schedule_warmup, ...); flags given here override it",
    )


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynlora", description="Dynamic LoRA fine-tuning for transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune on a GLUE task or your data; prints dev metrics",
        description="Fine-tune a model with an adapter method: a classifier on a GLUE task or your labelled data, "
        "or a causal language model on your prompt/completion, chat or text data (or a GLUE task posed to it). "
        f"With no flags: Dynamic LoRA on the embedded MiniLM-L6, GLUE SST-2, {QUICK_STEPS} steps.",
    )
    _add_settings(p)
    p.set_defaults(command_name="cmd_train")

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
    p.set_defaults(command_name="cmd_compare")

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
    p.set_defaults(command_name="cmd_eval")

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
    p.set_defaults(command_name="cmd_generate")

    p = sub.add_parser("report", help="PNG plots and a markdown summary of a run or a comparison directory")
    p.add_argument("directory", help="a run's --output-dir (log.jsonl) or a comparison's (results.jsonl)")
    p.set_defaults(command_name="cmd_report")

    p = sub.add_parser("export", help="write a dynlora adapter as a standard PEFT LoRA adapter")
    p.add_argument("--adapter", required=True, help="dynlora adapter directory")
    p.add_argument("--peft", required=True, help="output directory of the PEFT adapter")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.set_defaults(command_name="cmd_export")

    p = sub.add_parser("merge", help="merge an adapter into its base model and save a plain transformers model")
    p.add_argument("--adapter", required=True, help="adapter directory (dynlora or PEFT format)")
    p.add_argument("--out", required=True, help="output directory of the merged model")
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.set_defaults(command_name="cmd_merge")
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


@contextlib.contextmanager
def _loading(show: bool) -> Iterator[None]:
    """On a terminal, a status line while torch and transformers import (seconds), erased once they have: the
    command answers at once, and its own first line is still its first line."""
    if show:
        sys.stderr.write("dynlora: loading torch and transformers ...")
        sys.stderr.flush()
    try:
        yield
    finally:
        if show:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _run(args: argparse.Namespace) -> int:
    # Under torchrun every process meets the same error: the first one says it.
    first = os.environ.get("RANK", "0") == "0"
    say = (lambda text: print(text, file=sys.stderr)) if first else (lambda _: None)
    try:
        with _loading(first and sys.stderr.isatty()):
            commands = importlib.import_module(".training.commands", __package__)
        return getattr(commands, args.command_name)(args)
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
