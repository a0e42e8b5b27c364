"""Every bad input of the reliability issue, through the `dynlora` command: exit 2, one `error:` line saying what
was wrong and how to fix it, no traceback, and nothing half-written (no new run directory; old ones untouched).

In-process (cli.main) to keep it fast; test_cli.py runs a sample of them as real subprocesses."""

import json
from pathlib import Path

import pytest
from helpers import run_cli, tree_digest

from dynlora.cli import main

SST2_HEADER = "sentence\tlabel"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"


def glue_dir(root: Path, task_dir: str = "SST-2", train: bytes | None = None, header: str = SST2_HEADER) -> Path:
    """A GLUE-layout folder with a good dev file and the given train file bytes."""
    (root / task_dir).mkdir(parents=True, exist_ok=True)
    good = f"{header}\n" + ("fine\t0\nbad\t1\n" if header == SST2_HEADER else "0\tg\tf\t2012\t1\tn\tn\tA.\tB.\t2.5\n")
    (root / task_dir / "dev.tsv").write_text(good)
    (root / task_dir / "train.tsv").write_bytes(train if train is not None else good.encode())
    return root


BAD_TRAIN_FILES = [
    (b"text\tlabel\nfine\t0\n", "header has no column 'sentence'"),
    (b"sentence\nfine\n", "header has no column 'label'"),
    (b"sentence\tlabel\nfine\t0\textra\n", "train.tsv:2: 3 columns where the header has 2"),
    (b"sentence\tlabel\ncaf\xe9\t1\n", "train.tsv:2: not UTF-8"),
    (b"sentence\tlabel\nfine\t7\n", "label '7' is not one of sst2's labels"),
    (b"sentence\tlabel\n", "has no examples"),
]


@pytest.mark.parametrize(("train", "message"), BAD_TRAIN_FILES)
def test_bad_data_files(capsys, tmp_path, tiny_model_dir, train, message):
    data = glue_dir(tmp_path / "glue", train=train)
    out = tmp_path / "run"
    line = run_cli(
        capsys,
        "train",
        "--task",
        "sst2",
        "--data-dir",
        data,
        "--model",
        tiny_model_dir,
        "--output-dir",
        out,
        "--no-progress",
    )
    assert message in line and not out.exists()


def test_regression_target_not_a_number(capsys, tmp_path, tiny_model_dir):
    bad = f"{STSB_HEADER}\n0\tg\tf\t2012\t1\tn\tn\tA.\tB.\tfive\n".encode()
    data = glue_dir(tmp_path / "glue", "STS-B", train=bad, header=STSB_HEADER)
    line = run_cli(
        capsys,
        "train",
        "--task",
        "stsb",
        "--data-dir",
        data,
        "--model",
        tiny_model_dir,
        "--output-dir",
        tmp_path / "run",
    )
    assert "'five' is not a finite number" in line and not (tmp_path / "run").exists()


def test_missing_data_and_unknown_task(capsys, tmp_path):
    assert "no SST-2/ folder" in run_cli(capsys, "train", "--data-dir", tmp_path, "--output-dir", tmp_path / "r")
    (tmp_path / "SST-2").mkdir()
    assert "train.tsv" in run_cli(capsys, "train", "--data-dir", tmp_path, "--output-dir", tmp_path / "r")
    assert "unknown GLUE task 'glue9'" in run_cli(capsys, "train", "--task", "glue9")
    assert not (tmp_path / "r").exists()


def test_empty_dataset_after_filtering(capsys, tmp_path, tiny_model_dir):
    """A custom file with only its header, or a subset of size 0, leaves nothing to train on."""
    train = tmp_path / "train.csv"
    train.write_text("text,label\n")
    line = run_cli(
        capsys,
        "train",
        "--train-file",
        train,
        "--dev-file",
        train,
        "--model",
        tiny_model_dir,
        "--output-dir",
        tmp_path / "run",
    )
    assert "no examples" in line
    assert "--max-train-samples must be >= 1" in run_cli(
        capsys, "train", "--max-train-samples", 0, "--output-dir", tmp_path / "run"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--target-modules", "nothing_like_this"), "matched no module"),
        (("--rank", 100), "is larger than layer"),
        (("--rank", 4, "--min-rank", 5), "min_rank"),
        (("--max-steps", 4, "--schedule-final", 9), "beyond the run"),
        (("--input-adaptive", "magic"), "input_adaptive"),
        (("--init", "pissa"), "setting init must be one of lora, gradient, lora-ga, got 'pissa'"),
    ],
)
def test_adapter_settings_impossible_for_the_model(capsys, tmp_path, tiny_model_dir, extra, message):
    from helpers import GLUE, needs_glue

    if not GLUE.is_dir():
        pytest.skip(needs_glue.kwargs["reason"])
    out = tmp_path / "run"
    line = run_cli(
        capsys,
        "train",
        "--task",
        "rte",
        "--data-dir",
        GLUE,
        "--model",
        tiny_model_dir,
        "--max-train-samples",
        16,
        "--max-length",
        32,
        "--output-dir",
        out,
        "--no-progress",
        *extra,
    )
    assert message in line, line
    assert not (out / "checkpoints").exists() and not (out / "adapter").exists()


def test_model_path_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "m").mkdir()
    assert "is not a Hugging Face model directory" in run_cli(capsys, "train", "--model", tmp_path / "m")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir):
    from helpers import GLUE

    if not GLUE.is_dir():
        pytest.skip("no GLUE data")
    out = tmp_path_factory.mktemp("run") / "run"
    args = [
        "train",
        "--task",
        "rte",
        "--data-dir",
        str(GLUE),
        "--model",
        tiny_model_dir,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--max-train-samples",
        "16",
        "--max-eval-samples",
        "8",
        "--max-length",
        "32",
        "--rank",
        "2",
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    return out, args


def resume_error(capsys, finished_run, *changes) -> str:
    out, args = finished_run
    before = tree_digest(out / "checkpoints")
    line = run_cli(capsys, *args, "--resume", *changes)
    assert tree_digest(out / "checkpoints") == before  # a refused resume touches nothing
    return line


def test_resume_from_another_config_or_model(capsys, finished_run, tmp_path, tiny_model_dir):
    import shutil

    assert "lr was 0.0005 in the run in" in resume_error(capsys, finished_run, "--lr", "0.123")
    assert "adapter.rank was 2 in the run in" in resume_error(capsys, finished_run, "--rank", "3")
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    line = resume_error(capsys, finished_run, "--model", other)
    assert "model was" in line and "--resume continues a run with its own settings" in line


def test_resume_from_a_corrupt_or_truncated_checkpoint(capsys, finished_run, tmp_path):
    import shutil

    out, args = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    args = [a if a != str(out) else str(copy) for a in args]
    latest = copy / "checkpoints" / (copy / "checkpoints" / "LATEST").read_text().strip()
    weights = next(latest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    line = run_cli(capsys, *args, "--resume")
    assert "is damaged" in line and weights.name in line
    (latest / "manifest.json").write_text("{not json")
    assert "is damaged" in run_cli(capsys, *args, "--resume")


def test_adapter_directory_problems(capsys, tmp_path, finished_run):
    out, _ = finished_run
    (tmp_path / "empty").mkdir()
    for command in (
        ("eval", "--task", "rte"),
        ("export", "--peft", tmp_path / "peft"),
        ("merge", "--out", tmp_path / "merged"),
    ):
        line = run_cli(capsys, command[0], "--adapter", tmp_path / "empty", *command[1:])
        assert "not a Dynamic LoRA adapter directory" in line and "dynlora_config.json" in line
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dynlora_config.json").write_text(json.dumps({"rank": 2}))
    assert "error" in run_cli(capsys, "export", "--adapter", broken, "--peft", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_exporting_a_per_example_gate_to_peft(capsys, tmp_path, tiny_model_dir):
    from helpers import GLUE

    if not GLUE.is_dir():
        pytest.skip("no GLUE data")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--task",
                "rte",
                "--data-dir",
                str(GLUE),
                "--model",
                tiny_model_dir,
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--max-train-samples",
                "16",
                "--max-eval-samples",
                "8",
                "--max-length",
                "32",
                "--rank",
                "2",
                "--input-adaptive",
                "per_example",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    line = run_cli(capsys, "export", "--adapter", out / "adapter", "--peft", tmp_path / "peft")
    assert "per_example" in line and "cannot be folded" in line
    assert not (tmp_path / "peft").exists()
    line = run_cli(capsys, "merge", "--adapter", out / "adapter", "--out", tmp_path / "merged")
    assert "cannot be folded" in line and not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: abc\n", "setting lr must be a number, got 'abc'"),
        ("batch_size: 3.5\n", "setting batch_size must be an integer, got 3.5"),
        ("lr: [1]\n", "setting lr must be a number"),
        ("adapter:\n  temperature: warm\n", "setting temperature must be a number"),
        ("adapter:\n  reallocate: perhaps\n", "setting reallocate must be true or false, got 'perhaps'"),
    ],
)
def test_config_file_values_of_the_wrong_type(capsys, tmp_path, text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    assert message in run_cli(capsys, "train", "--config", cfg, "--output-dir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    from dynlora.cli import build_parser
    from dynlora.training.commands import train_settings

    cfg = tmp_path / "run.yaml"
    cfg.write_text('lr: 1e-3\nbatch_size: "16"\nadapter:\n  warmup: "50"\n  temperature: 2e0\n')
    config = train_settings(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert config.lr == 1e-3 and config.batch_size == 16 and isinstance(config.batch_size, int)
    assert config.adapter.warmup == 50 and isinstance(config.adapter.warmup, int) and config.adapter.temperature == 2


def test_export_and_merge_never_overwrite_or_half_write(capsys, tmp_path, finished_run, monkeypatch):
    out, _ = finished_run
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    for command in (("export", "--peft"), ("merge", "--out")):
        line = run_cli(capsys, command[0], "--adapter", out / "adapter", command[1], taken)
        assert "already exists and is not empty" in line
    assert [p.name for p in taken.iterdir()] == ["mine.txt"] and (taken / "mine.txt").read_text() == "keep me"

    from transformers import PreTrainedTokenizerBase

    def fail_midway(self, directory, *args, **kwargs):
        (Path(directory) / "tokenizer.json").write_text("{")  # a first file lands, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail_midway)
    line = run_cli(capsys, "merge", "--adapter", out / "adapter", "--out", tmp_path / "merged")
    assert "No space left on device" in line
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.*"))  # nothing half-written
    monkeypatch.undo()
    assert main(["merge", "--adapter", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file() and not list(tmp_path.glob(".merged.*"))
