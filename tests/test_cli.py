"""The `dynlora` command end to end, as a user runs it: train -> eval -> export -> merge; errors; torchrun."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, GLUE, dynlora, needs_glue, wait_until_training

pytestmark = needs_glue


def quick(model, out, *extra):
    return (
        "train",
        "--task",
        "rte",
        "--model",
        model,
        "--data-dir",
        GLUE,
        "--max-steps",
        6,
        "--batch-size",
        8,
        "--max-train-samples",
        64,
        "--max-length",
        64,
        "--rank",
        4,
        "--output-dir",
        out,
        "--no-progress",
        *extra,
    )


def test_train_eval_export_merge(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    done = dynlora(*quick(tiny_model_dir, run))  # the default starts over-parameterised, pruned to the budget
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dev metrics after 6 steps" in done.stdout and "final ranks" in done.stdout
    start = re.search(r"([\d,]+) trainable parameters at the start, pruned to at most ([\d,]+) while", done.stdout)
    end = re.search(r"trainable parameters: ([\d,]+), pruned from ([\d,]+)", done.stdout)
    count = [[int(n.replace(",", "")) for n in m.groups()] for m in (start, end)]
    assert count[0][0] == count[1][1] > count[0][1] >= count[1][0], done.stdout  # peak > budget >= final
    accuracy = json.loads((run / "results.json").read_text())["metrics"]["validation"]["accuracy"]

    done = dynlora(
        "eval",
        "--adapter",
        run / "adapter",
        "--task",
        "rte",
        "--model",
        tiny_model_dir,
        "--data-dir",
        GLUE,
        "--max-length",
        64,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"accuracy {accuracy:.4f}" in done.stdout  # the saved adapter reproduces the run's own evaluation

    evaluate = ("eval", "--adapter", run / "adapter", "--task", "rte", "--model", tiny_model_dir, "--data-dir", GLUE)
    done = dynlora(*evaluate, "--max-length", 64, "--predictions", tmp_path / "predictions.jsonl")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    dev = (Path(GLUE) / "RTE" / "dev.tsv").read_text().splitlines()[1:]
    assert [r["index"] for r in rows] == list(range(len(dev))) and {r["split"] for r in rows} == {"validation"}
    assert [r["label"] for r in rows] == [int(line.split("\t")[-1] == "not_entailment") for line in dev]
    assert sum(r["label"] == r["prediction"] for r in rows) / len(rows) == pytest.approx(accuracy)
    done = dynlora(*evaluate, "--max-eval-samples", 10, "--predictions", tmp_path / "p.jsonl")
    assert done.returncode == 2 and "drop --max-eval-samples" in done.stderr and not (tmp_path / "p.jsonl").exists()

    done = dynlora("export", "--adapter", run / "adapter", "--peft", tmp_path / "peft", "--model", tiny_model_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    done = dynlora(
        "eval",
        "--adapter",
        tmp_path / "peft",
        "--task",
        "rte",
        "--model",
        tiny_model_dir,
        "--data-dir",
        GLUE,
        "--max-length",
        64,
    )
    assert done.returncode == 0 and f"accuracy {accuracy:.4f}" in done.stdout, done.stderr[-3000:]

    done = dynlora("merge", "--adapter", run / "adapter", "--out", tmp_path / "merged", "--model", tiny_model_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 classifier whose tokenizer has no pad token (as GPT-2's), saved as a model directory."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from dynlora import default_model_path

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.eos_token, tok.pad_token = "[SEP]", None
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128, pad_token_id=None)
    GPT2ForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_eval_export_and_merge_of_a_gpt2_adapter_pad_as_training_did(tiny_gpt2_dir, tmp_path):
    run = tmp_path / "run"
    done = dynlora(*quick(tiny_gpt2_dir, run))
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = json.loads((run / "results.json").read_text())["metrics"]["validation"]["accuracy"]
    done = dynlora("eval", "--adapter", run / "adapter", "--task", "rte", "--data-dir", GLUE, "--max-length", 64)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"accuracy {accuracy:.4f}" in done.stdout  # batches padded with EOS, read at the last real token
    done = dynlora("merge", "--adapter", run / "adapter", "--out", tmp_path / "merged")
    assert done.returncode == 0, done.stderr[-3000:]


def test_config_file_and_flag_precedence(tiny_model_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"task: rte\nmodel: {tiny_model_dir}\ndata_dir: {GLUE}\nmax_steps: 3\nbatch_size: 8\n"
        "max_train_samples: 32\nmax_eval_samples: 16\n"
        "adapter:\n  rank: 2\n  input_adaptive: none\n"
    )
    done = dynlora("train", "--config", cfg, "--max-steps", 4, "--output-dir", tmp_path / "r", "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["max_steps"] == 4 and saved["adapter"]["rank"] == 2 and saved["adapter"]["input_adaptive"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("train", "--task", "glue9"), "unknown GLUE task 'glue9'"),
        (("train", "--data-dir", "/nonexistent/glue"), "no SST-2/ folder in /nonexistent/glue"),
        (("train", "--method", "magic"), "setting method must be one of dynamic, lora, peft-lora, peft-adalora"),
        (("train", "--resume", "--output-dir", "/tmp/dynlora-no-such-run"), "no checkpoint to resume from"),
        (("eval", "--adapter", "/tmp", "--task", "rte"), "not a Dynamic LoRA adapter directory"),
        (("train", "--model", "/tmp"), "/tmp is not a Hugging Face model directory: it has no config.json"),
        (("train", "--rank", "0"), "rank must be >= 1"),
    ],
)
def test_user_errors_are_one_line(args, message):
    done = dynlora(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_torchrun_two_processes(tiny_model_dir, tmp_path):
    done = dynlora(
        "--nproc_per_node",
        2,
        "-m",
        "dynlora.cli",
        *quick(tiny_model_dir, tmp_path / "ddp"),
        module=("-m", "torch.distributed.run"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert result["steps"] == 6
    start = json.loads((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert (tmp_path / "ddp" / "adapter" / "dynlora_config.json").is_file()
    assert done.stdout.count("dynamic on rte") == 1 and done.stdout.count("dev metrics after") == 1  # one speaker


def test_compare_resumes_and_report_draws(tiny_model_dir, tmp_path):
    root = tmp_path / "cmp"
    args = (
        "compare",
        "--tasks",
        "rte",
        "--methods",
        "dynamic,lora",
        "--seeds",
        "0,1",
        "--model",
        tiny_model_dir,
        "--data-dir",
        GLUE,
        "--max-steps",
        4,
        "--batch-size",
        8,
        "--max-train-samples",
        48,
        "--max-eval-samples",
        24,
        "--max-length",
        48,
        "--rank",
        4,
        "--output-dir",
        root,
        "--no-progress",
    )
    done = dynlora(*args, "--jobs", 2)  # worker processes; the resumed run below goes one at a time
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| dynamic |" in done.stdout and "(n=2)" in done.stdout and "done: rte" in done.stdout
    results = (root / "results.jsonl").read_text().splitlines()
    assert len(results) == 4

    # An interruption before the last run finished: its line is missing. The same command runs only that one.
    kept = [line for line in results if (json.loads(line)["method"], json.loads(line)["seed"]) != ("lora", 1)]
    (root / "results.jsonl").write_text("\n".join(kept) + "\n")  # --jobs: lines are in order of finishing
    shutil.rmtree(root / "rte" / "lora" / "seed1")
    done = dynlora(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[4/4] rte lora seed 1" in done.stdout and "[1/4]" not in done.stdout
    assert len((root / "results.jsonl").read_text().splitlines()) == 4

    done = dynlora("report", root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "comparison.png").is_file() and (root / "final_ranks.png").is_file()
    assert "| lora |" in (root / "report.md").read_text()
    done = dynlora("report", root / "rte" / "dynamic" / "seed0")
    assert done.returncode == 0, done.stderr[-3000:]
    for png in ("learning_curves.png", "rank_allocation.png", "importance.png"):
        assert (root / "rte" / "dynamic" / "seed0" / png).is_file()
    done = dynlora("report", tmp_path)
    assert done.returncode == 2 and "neither a run directory" in done.stderr


def test_schedule_flags_and_unknown_adapter_settings(tmp_path):
    from dynlora.cli import build_parser
    from dynlora.training.commands import train_settings

    def config(*argv):
        return train_settings(build_parser().parse_args(["train", *argv, "--output-dir", str(tmp_path)]))

    cfg = config("--schedule-warmup", "50", "--schedule-final", "1.0", "--schedule-interval", "0.1")
    assert cfg.adapter.warmup == 50 and isinstance(cfg.adapter.warmup, int)  # above 1: a step count
    assert cfg.adapter.final == 1.0 and isinstance(cfg.adapter.final, float)  # 1.0: the whole run, not step 1
    assert cfg.adapter.interval == 0.1
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapter:\n  rnak: 4\n")
    done = dynlora("train", "--config", bad)
    assert done.returncode == 2 and "unknown setting(s) adapter.rnak" in done.stderr and "Traceback" not in done.stderr


def test_sigterm_stops_a_parallel_comparison_resumably(tiny_model_dir, tmp_path):
    import signal

    root = tmp_path / "cmp"
    args = (
        "compare",
        "--tasks",
        "rte",
        "--methods",
        "dynamic,lora",
        "--seeds",
        "0,1",
        "--model",
        tiny_model_dir,
        "--data-dir",
        GLUE,
        "--max-steps",
        400,
        "--batch-size",
        4,
        "--max-train-samples",
        64,
        "--max-eval-samples",
        8,
        "--max-length",
        32,
        "--rank",
        2,
        "--output-dir",
        root,
        "--jobs",
        2,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynlora.cli", *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    logs = [root / "rte" / "dynamic" / f"seed{s}" / "log.jsonl" for s in (0, 1)]  # the first two runs
    wait_until_training(proc, logs)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Resume with the same command" in err and "Traceback" not in err
    for log in logs:  # each running training saved a checkpoint before stopping
        assert (log.parent / "checkpoints" / "LATEST").is_file()
    assert not (root / "results.jsonl").is_file() or not (root / "results.jsonl").read_text().strip()
    assert not (root / "rte" / "lora").exists()  # the runs queued behind them did not start

    done = dynlora(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(resuming)") == 2
    assert len((root / "results.jsonl").read_text().splitlines()) == 4


def test_sigkill_of_a_parallel_comparison_leaves_resumable_runs(tiny_model_dir, tmp_path):
    """The parent dies without a word: its workers notice, save a checkpoint and exit (no orphans training on)."""
    import signal
    import time

    root = tmp_path / "cmp"
    args = (
        "compare",
        "--tasks",
        "rte",
        "--methods",
        "dynamic,lora",
        "--seeds",
        "0",
        "--model",
        tiny_model_dir,
        "--data-dir",
        GLUE,
        "--max-steps",
        400,
        "--batch-size",
        4,
        "--max-train-samples",
        64,
        "--max-eval-samples",
        8,
        "--max-length",
        32,
        "--rank",
        2,
        "--output-dir",
        root,
        "--jobs",
        2,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynlora.cli", *map(str, args)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    logs = [root / "rte" / m / "seed0" / "log.jsonl" for m in ("dynamic", "lora")]
    wait_until_training(proc, logs)

    def children() -> list[int]:
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    workers = children()
    assert workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 120

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    while any(alive(pid) for pid in workers):
        assert time.time() < deadline, "workers kept running after their parent was killed"
        time.sleep(0.5)
    for log in logs:
        assert (log.parent / "checkpoints" / "LATEST").is_file()
    done = dynlora(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(resuming)") == 2
