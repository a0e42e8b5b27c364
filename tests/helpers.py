"""What several test files share: the GLUE data, running the `dynlora` command (in this process or another),
small data files and the argument lists of quick training runs."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynlora.cli import main

GLUE = Path(os.environ.get("DYNLORA_GLUE_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"))


needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"no GLUE data at {GLUE}")


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


WORDS = ["good", "bad", "fine", "awful", "great", "poor", "nice", "terrible", "lovely", "dull"]


def ok(capsys, *args) -> str:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def run_cli(capsys, *args) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def dynlora(*args, timeout=600, module=("-m", "dynlora.cli")):
    cmd = [sys.executable, *module, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


def wait_until_training(proc: subprocess.Popen, logs: list[Path], timeout: float = 300) -> None:
    """Until every run of ``logs`` has logged training steps (start record + two loss records)."""

    deadline = time.time() + timeout
    while not all(p.is_file() and len(p.read_text().splitlines()) > 2 for p in logs):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)


def csv_data(root: Path, labels: list, n: int = 24, name: str = "train.csv", header: str = "text,label") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]} movie,{labels[i % len(labels)]}" for i in range(n)]
    (root / name).write_text(header + "\n" + "\n".join(rows) + "\n")
    return root / name


def train_args(
    model: str, train: Path, out: Path, *extra, dev: Path | None = None, steps: int = 2, length: int = 32
) -> list:
    """A quick run on ``train`` at rank 2, scored on ``dev`` (default: a dev file beside it, else ``train``)."""
    sibling = train.with_name("dev" + train.suffix)
    dev = dev or (sibling if sibling.exists() else train)
    return [
        *("train", "--model", model, "--train-file", train, "--dev-file", dev, "--output-dir", out, "--no-progress"),
        *("--max-steps", steps, "--batch-size", 4, "--max-length", length, "--rank", 2),
        *extra,
    ]


def chat_file(path: Path, n: int = 16, assistant: bool = True) -> Path:
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"what is {i} plus one"}]
        if assistant:
            messages.append({"role": "assistant", "content": f"it is {i + 1}"})
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n")
    return path


def quick(model: str, train: Path, out: Path, *extra) -> list:
    """A language model's quick run on ``train`` (scored on it too): every linear layer, 4 steps of up to 64
    tokens, re-allocating at steps 2 and 3."""
    schedule = ("--schedule-warmup", 2, "--schedule-interval", 1, "--schedule-final", 3)
    return train_args(
        model, train, out, "--target-modules", "all-linear", *schedule, *extra, dev=train, steps=4, length=64
    )
