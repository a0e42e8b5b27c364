"""Faults: SIGKILL at any moment (also mid-write) and a full disk leave the previous checkpoint loadable."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import GLUE, needs_glue

from dynlora.training import checkpoint
from dynlora.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dynlora.training.errors import CheckpointError

IDENTITY = {"run": "reliability"}

WRITER = """
import sys, torch
from dynlora.training.checkpoint import save_checkpoint
root, step = sys.argv[1], 0
weights = {"w": torch.randn(512, 512)}  # ~1 MB: a write takes long enough to be killed in the middle
while True:
    step += 1
    weights["w"].fill_(step)
    save_checkpoint(root, step, weights, {"step": step}, {"run": "reliability"})
"""


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.011, 0.027, 0.05, 0.083])
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path, delay):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)])
    try:
        deadline = time.time() + 60
        while latest_checkpoint(tmp_path) is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tensors, state, step = load_checkpoint(tmp_path, IDENTITY)  # verified against its checksums
    assert step >= 1 and state["step"] == step and torch.all(tensors["w"] == step)
    # The next save cleans up whatever the killed writer left half-written.
    save_checkpoint(tmp_path, step + 1, tensors, {"step": step + 1}, IDENTITY)
    assert not list(tmp_path.glob(".step-*.tmp"))
    assert load_checkpoint(tmp_path, IDENTITY)[2] == step + 1


def test_disk_full_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1}, IDENTITY)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is kept"):
        save_checkpoint(tmp_path, 2, {"w": torch.full((3,), 2.0)}, {"step": 2}, IDENTITY)
    assert not list(tmp_path.glob(".step-*.tmp"))
    tensors, state, step = load_checkpoint(tmp_path, IDENTITY)
    assert step == 1 and torch.all(tensors["w"] == 1)


def test_a_different_setting_is_named_in_one_line(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"step": 1}, {"lr": 1e-3, "adapter": {"rank": 8}})
    with pytest.raises(CheckpointError, match=r"from another run: adapter\.rank was 8, now 4"):
        load_checkpoint(tmp_path, {"lr": 1e-3, "adapter": {"rank": 4}})
    with pytest.raises(CheckpointError, match=r"from another run: adapter\.init was None, now 'lora'"):
        load_checkpoint(tmp_path, {"lr": 1e-3, "adapter": {"rank": 8, "init": "lora"}})


@needs_glue
def test_sigkill_of_a_training_run_then_resume_gives_the_same_metrics(tiny_model_dir, tmp_path):
    args = [
        sys.executable,
        "-m",
        "dynlora.cli",
        "train",
        "--task",
        "rte",
        "--model",
        tiny_model_dir,
        "--data-dir",
        str(GLUE),
        "--max-steps",
        "16",
        "--batch-size",
        "8",
        "--max-train-samples",
        "128",
        "--max-length",
        "48",
        "--rank",
        "4",
        "--save-every",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight = subprocess.run([*args, "--output-dir", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = tmp_path / "b"
    proc = subprocess.Popen(
        [*args, "--output-dir", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = latest_checkpoint(killed / "checkpoints")
        if latest is not None and int(latest.name.split("-")[1]) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists()  # it really died mid-run
    resumed = subprocess.run([*args, "--output-dir", str(killed), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("a", "b"))
    assert a["metrics"] == b["metrics"] and a["ranks"] == b["ranks"]
