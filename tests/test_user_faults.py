"""What a new user broke (reliability, round 2), through the `dynlora` command: one `error:` line and nothing of
the user's changed, labels that keep the user's order and names, runs that resume from their directory alone."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml
from helpers import csv_data, ok, run_cli, train_args, tree_digest

from dynlora.cli import main
from dynlora.training.run_dir import RunDirectory

# --- data lost or results silently wrong ----------------------------------------------------------------------


def test_an_output_dir_of_someone_elses_files_is_refused_untouched(capsys, tmp_path, tiny_model_dir):
    theirs = tmp_path / "mine"
    (theirs / "adapter").mkdir(parents=True)
    for name in ("config.json", "results.json", "log.jsonl", "adapter/weights.bin"):
        (theirs / name).write_text("the user's own file\n")
    before = tree_digest(theirs)
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    line = run_cli(capsys, *train_args(tiny_model_dir, train, theirs))
    assert "holds files that are not a dynlora run" in line and "choose a new or empty directory" in line
    assert tree_digest(theirs) == before


def test_integer_labels_keep_their_order_and_names_reach_adapter_merge_and_results(capsys, tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    train = csv_data(tmp_path / "data", list(range(11)), n=44)
    out = tmp_path / "run"
    ok(capsys, *train_args(tiny_model_dir, train, out))
    names = [str(i) for i in range(11)]  # 0..10 as numbers, not '0', '1', '10', '2', ...
    assert json.loads((out / "results.json").read_text())["labels"] == names
    assert json.loads((out / "adapter" / "dynlora_config.json").read_text())["labels"] == names
    ok(capsys, "merge", "--adapter", out / "adapter", "--out", tmp_path / "merged")
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    assert config.id2label == dict(enumerate(names)) and config.label2id["10"] == 10


def test_class_names_reach_the_merged_models_id2label(capsys, tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    train = csv_data(tmp_path / "data", ["pos", "neg"])
    ok(capsys, *train_args(tiny_model_dir, train, tmp_path / "run"))
    ok(capsys, "merge", "--adapter", tmp_path / "run" / "adapter", "--out", tmp_path / "merged")
    assert AutoConfig.from_pretrained(tmp_path / "merged").id2label == {0: "neg", 1: "pos"}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (["pos"], "every example has the label 'pos'; a classifier needs at least two classes"),
        ([0.5, 1.25, 3.8], "the labels are numbers (e.g."),
    ],
)
def test_labels_that_cannot_train_a_classifier_are_one_line(capsys, tmp_path, tiny_model_dir, labels, message):
    train = csv_data(tmp_path / "data", labels)
    line = run_cli(capsys, *train_args(tiny_model_dir, train, tmp_path / "run"))
    assert message in line and not (tmp_path / "run").exists()
    if isinstance(labels[0], float):
        assert "pass --regression" in line


# --- tracebacks instead of one line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adapter: 4\n", "adapter must be a mapping of adapter settings, got 4"),
        ("task: 5\n", "setting task must be a string, got 5"),
        ("target_modules: [1, 2]\n", "setting target_modules must be a list of module names or one regex"),
        ("text_col: [a]\n", "setting text_col must be a string, got ['a']"),
        ("rank: 4\nschedule_warmup: 0.2\nlr: 1.0e-3\nrnak: 4\n", "unknown setting(s) rnak; a key is a flag's name"),
    ],
)
def test_config_values_of_the_wrong_kind_are_one_line(capsys, tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert message in run_cli(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_config_file_mirroring_the_flags_is_read(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    cfg = tmp_path / "run.yaml"
    settings = {
        "model": tiny_model_dir,
        "train_file": str(train),
        "dev_file": str(train),
        "max_steps": 2,
        "batch_size": 4,
        "rank": 2,
        "schedule_warmup": 1,
        "schedule_final": 2,
        "output_dir": str(tmp_path / "r"),
        "progress": False,
    }
    cfg.write_text(yaml.safe_dump(settings))
    ok(capsys, "train", "--config", cfg)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["adapter"]["rank"] == 2 and saved["adapter"]["warmup"] == 1


# --- misleading or raw messages -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "inf"], "setting lr must be a number, got 'inf'"),
        (["--lr", "-1e-3"], "lr must be a finite number > 0, got -0.001"),
        (["--loraplus-lr-ratio", "0"], "loraplus_lr_ratio must be a finite number > 0 (LoRA+ uses 16), got 0.0"),
        (["--max-length", "100000"], "--max-length 100000 is more than the model takes (128 positions)"),
    ],
)
def test_impossible_numbers_are_one_line_and_leave_no_run_directory(capsys, tmp_path, tiny_model_dir, flags, message):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    args = train_args(tiny_model_dir, train, tmp_path / "run")
    args = [a for a in args if a != "--max-length" and a != 32] + flags
    assert message in run_cli(capsys, *args)
    assert not (tmp_path / "run").exists()


def test_a_run_that_diverges_before_any_checkpoint_says_so_and_leaves_nothing(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    args = train_args(tiny_model_dir, train, tmp_path / "run", "--lr", "1e30", "--max-grad-norm", "0")
    args[args.index("--max-steps") + 1] = 20
    assert main([str(a) for a in args]) == 2
    *warned, line = capsys.readouterr().err.strip().splitlines()  # the engine may warn first, in one line each
    assert line.startswith("error: ") and all(w.startswith("warning: ") for w in warned)
    assert "not finite for 5 steps in a row" in line and "No checkpoint had been written" in line
    assert "last checkpoint was kept" not in line and not (tmp_path / "run").exists()


def test_paths_of_the_wrong_kind_are_named_before_anything_loads(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    (tmp_path / "folder").mkdir()
    assert "is a directory; give a .csv, .tsv or .jsonl file" in run_cli(
        capsys, *train_args(tiny_model_dir, tmp_path / "folder", tmp_path / "run")
    )
    (tmp_path / "afile").write_text("x")
    assert "--output-dir" in run_cli(capsys, *train_args(tiny_model_dir, train, tmp_path / "afile"))
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert f"config file {tmp_path / 'binary.yaml'} is not UTF-8 text" in run_cli(
        capsys, "train", "--config", tmp_path / "binary.yaml"
    )
    (tmp_path / "run.txt").write_text("lr: 1e-3\n")
    assert "name it .yaml, .yml or .json" in run_cli(capsys, "train", "--config", tmp_path / "run.txt")
    assert "--dev-file needs --train-file" in run_cli(capsys, "train", "--task", "rte", "--dev-file", train)
    assert not (tmp_path / "run").exists()


def test_custom_data_results_name_the_file_and_eval_scores_a_dev_file(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    dev = csv_data(tmp_path / "data", ["neg", "pos"], n=12, name="dev.csv")
    out = tmp_path / "run"
    ok(capsys, *train_args(tiny_model_dir, train, out))
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == str(train)
    text = ok(capsys, "eval", "--adapter", out / "adapter", "--dev-file", dev)
    assert f"accuracy {result['metrics']['validation']['accuracy']:.4f}" in text  # the run's own evaluation
    assert "give --task" in run_cli(capsys, "eval", "--adapter", out / "adapter")


def test_run_files_are_readable_as_the_umask_allows(capsys, tmp_path, tiny_model_dir):
    old = os.umask(0o022)
    try:
        train = csv_data(tmp_path / "data", ["pos", "neg"])
        ok(capsys, *train_args(tiny_model_dir, train, tmp_path / "run"))
        ok(capsys, "export", "--adapter", tmp_path / "run" / "adapter", "--peft", tmp_path / "peft")
        ok(capsys, "merge", "--adapter", tmp_path / "run" / "adapter", "--out", tmp_path / "merged")
        ok(capsys, *train_args(tiny_model_dir, train, tmp_path / "peft-run", "--method", "peft-lora"))
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "data" not in p.parts and p.name != ".dynlora-run"]
    assert any(p.name == "weights.safetensors" for p in written) and any(p.parent.name == "merged" for p in written)
    assert {p: oct(stat.S_IMODE(p.stat().st_mode)) for p in written if stat.S_IMODE(p.stat().st_mode) != 0o644} == {}
    assert stat.S_IMODE((tmp_path / "peft").stat().st_mode) == 0o755


# --- faults and resume ----------------------------------------------------------------------------------------


def test_resume_needs_only_the_run_directory(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    out = tmp_path / "run"
    ok(capsys, *train_args(tiny_model_dir, train, out, "--save-every", 1))
    (out / "results.json").unlink()  # as if it had stopped after its last checkpoint
    text = ok(capsys, "train", "--output-dir", out, "--resume", "--eval-every", 5)
    assert "resuming" in text and "eval_every 0 -> 5" in text and "dev metrics after 2 steps" in text


def test_resuming_a_finished_run_writes_nothing(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    out = tmp_path / "run"
    ok(capsys, *train_args(tiny_model_dir, train, out))
    before = tree_digest(out)
    text = ok(capsys, "train", "--output-dir", out, "--resume")
    assert "had already finished; nothing was trained or written" in text
    assert tree_digest(out) == before


def test_a_second_run_on_a_directory_in_use_is_refused(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    first = RunDirectory(tmp_path / "run")
    first.claim()  # a run holding the directory
    try:
        line = run_cli(capsys, *train_args(tiny_model_dir, train, tmp_path / "run"))
        assert f"is in use by another dynlora run (process {os.getpid()})" in line
    finally:
        first.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".dynlora-run"]


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"], n=400)
    args = [str(a) for a in train_args(tiny_model_dir, train, tmp_path / "run")]
    args[args.index("--max-steps") + 1] = "100000"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dynlora.cli", *args], stderr=subprocess.PIPE, text=True, env=env)
    log = tmp_path / "run" / "log.jsonl"
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) > 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_what_a_person_sees_loads_quietly(tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    args = [str(a) for a in train_args(tiny_model_dir, train, tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "dynlora.cli", *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].startswith("dynamic on ")  # the command's own first line comes first
    assert "\x1b[" not in done.stdout + done.stderr and "Loading weights" not in done.stderr
    assert "Skipping publisher trust check" not in done.stderr and "gemm_4bit" not in done.stderr  # bitsandbytes


def test_the_report_names_its_axes_and_metric_and_a_stopped_run(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    out = tmp_path / "run"
    ok(
        capsys,
        *train_args(
            tiny_model_dir,
            train,
            out,
            "--save-every",
            1,
            "--eval-every",
            1,
            "--schedule-warmup",
            1,
            "--schedule-interval",
            1,
            "--schedule-final",
            1,
        ),
    )
    ok(capsys, "report", out)
    report = (out / "report.md").read_text()
    assert "dev accuracy" in report and "the first column is the start" in report
    (out / "results.json").unlink()
    ok(capsys, "report", out)
    assert "stopped at step 2 before it finished" in (out / "report.md").read_text()
    run_dir = RunDirectory(out)
    run_dir.claim(resume=True)
    try:
        ok(capsys, "report", out)
        assert "- running: at step 2" in (out / "report.md").read_text()
    finally:
        run_dir.release()
