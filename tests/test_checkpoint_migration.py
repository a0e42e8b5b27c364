"""Checkpoints written before the current format: they resume (exactly), or are refused in one line saying why.

tests/fixtures/v1_run holds real format-1 checkpoints written by dynlora 0.1 (its README says how).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynlora.config import PREDATING
from dynlora.input_adaptation import InputNorm
from dynlora.training.checkpoint import load_checkpoint, save_checkpoint
from dynlora.training.errors import CheckpointError
from dynlora.training.loop import train
from dynlora.training.migrations import CHECKPOINT_VERSION
from dynlora.training.settings import TrainSettings

FIXTURE = Path(__file__).parent / "fixtures" / "v1_run"
WRITTEN_WITH = {"/tmp/v1_tiny_model": "model", "/tmp/v1data": "data"}


def v1_run(method: str, tmp_path: Path, model_dir: str) -> Path:
    """A copy of the fixture's interrupted run, its manifest pointed at this test's model and data."""
    run = tmp_path / method
    shutil.copytree(FIXTURE / method, run, ignore=shutil.ignore_patterns("expected"))
    shutil.copytree(FIXTURE / "data", tmp_path / "data", dirs_exist_ok=True)
    paths = {"/tmp/v1_tiny_model": model_dir, "/tmp/v1data": str(tmp_path / "data")}
    for manifest in run.glob("checkpoints/step-*/manifest.json"):
        text = manifest.read_text()
        for old, new in paths.items():
            text = text.replace(old, new)
        manifest.write_text(text)
    return run


def settings(method: str, run: Path, model_dir: str, **changes) -> TrainSettings:
    """The settings the fixture's run was written with (its config.json), as this dynlora reads them; for AdaLoRA,
    the schedule it really ran (it read none of the schedule settings then)."""
    data = run.parent / "data"
    adapter = {"rank": 2, "target_modules": ["query", "value"], "warmup": 2, "interval": 1, "final": 5}
    if method == "peft-adalora":
        adapter.update(warmup=0.1, interval=0.05, final=0.8)
    adapter.update(PREDATING)  # what resumed_settings reads into a config.json written before those settings
    if method == "dynamic":  # dynlora 0.1's defaults: the gradient start and input normalisation (recorded), a
        adapter.update(init="gradient", input_adaptive="mergeable", input_norm_every=1)  # fold every step (not)
    return TrainSettings(
        model=model_dir,
        method=method,
        train_file=str(data / "train.csv"),
        dev_file=str(data / "dev.csv"),
        max_steps=6,
        batch_size=4,
        lr=5e-3,
        output_dir=str(run),
        progress=False,
        resume=True,
        adapter={**adapter, **changes.pop("adapter", {})},
        **changes,
    )


@pytest.mark.parametrize("method", ["dynamic", "lora", "peft-adalora"])
def test_a_format_1_checkpoint_resumes_to_what_dynlora_0_1_finished_with(tiny_model_dir, tmp_path, method):
    run = v1_run(method, tmp_path, tiny_model_dir)
    result = train(settings(method, run, tiny_model_dir))
    expected = json.loads((FIXTURE / method / "expected" / "results.json").read_text())
    assert result["metrics"] == expected["metrics"]
    assert result["ranks"] == expected["ranks"] and result["steps"] == expected["steps"] == 6
    weights = "adapter_model.safetensors" if method.startswith("peft") else "dynlora_model.safetensors"
    ours, theirs = load_file(run / "adapter" / weights), load_file(FIXTURE / method / "expected" / weights)
    assert {k for k in ours if not InputNorm.is_unfolded(k)} == theirs.keys()  # 0.1 kept no unfolded statistics
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)
    manifest = json.loads(next(run.glob("checkpoints/step-*/manifest.json")).read_text())
    assert manifest["format_version"] == CHECKPOINT_VERSION  # what the resumed run wrote


def test_a_format_1_checkpoint_with_other_settings_is_refused_naming_the_setting(tiny_model_dir, tmp_path):
    run = v1_run("dynamic", tmp_path, tiny_model_dir)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match=r"another run: adapter\.temperature was 1\.0, now 2\.0"):
        train(settings("dynamic", run, tiny_model_dir, adapter={"temperature": 2.0}))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def _v1_identity(method: str, **adapter) -> dict:
    """A format-1 manifest identity as dynlora 0.1 wrote it (its AdapterSettings), minus settings it lacked."""
    recorded = {
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": None,
        "max_rank": None,
        "min_rank": 1,
        "importance": "sensitivity",
        "temperature": 1.0,
        "max_rank_change": None,
        "warmup": 0.1,
        "interval": 0.05,
        "final": 0.8,
        "input_adaptive": "mergeable",
        "seed": 0,
        **adapter,
    }
    identity = TrainSettings(method=method).identity()
    return {**identity, "adapter": recorded}


def _write_v1(root: Path, identity: dict, method_state: dict) -> None:
    save_checkpoint(root, 1, {"w": torch.ones(3)}, {"method": method_state}, identity)
    manifest = next(root.glob("step-*/manifest.json"))
    data = json.loads(manifest.read_text())
    del data["format_version"]  # format 1 had none
    manifest.write_text(json.dumps(data))


MERGEABLE = {"input_adaptive": "mergeable"}  # recorded in a format-1 run's config.json, which resume reads
EVERY_STEP = {**MERGEABLE, "input_norm_every": 1}  # format 1 folded input statistics in after every step


@pytest.mark.parametrize(
    ("method", "adapter", "ours", "refusal"),
    [
        ("lora", {}, {}, None),  # static LoRA did then what it does now: random A, static, no input scaling
        ("dynamic", {}, EVERY_STEP, None),  # Dynamic LoRA started random then, as its default does again
        ("dynamic", {}, {"init": "gradient", **EVERY_STEP}, r"adapter\.init was 'lora', now 'gradient'"),
        ("dynamic", {}, MERGEABLE, r"adapter\.input_norm_every was 1, now 10"),
        (
            "dynamic",
            {"init": "gradient", "reallocate": False},
            {"init": "gradient", "reallocate": False, **EVERY_STEP},
            None,
        ),
        ("peft-lora", {"temperature": 3.0}, {}, None),  # PEFT never used the engine's settings
        # AdaLoRA pruned on fixed fractions until it read the schedule settings (format 8), whatever they said
        ("peft-adalora", {"warmup": 2}, {}, None),
        ("peft-adalora", {"warmup": 2}, {"warmup": 2}, r"adapter\.warmup was 0\.1, now 2"),
    ],
)
def test_settings_a_format_1_checkpoint_did_not_record_resume_at_what_the_library_did_then(
    tmp_path, method, adapter, ours, refusal
):
    _write_v1(tmp_path, _v1_identity(method, **adapter), {"allocator": {}} if method == "dynamic" else {})
    # As resumed_settings reads the run's config.json, written before the settings PREDATING names.
    identity = TrainSettings(method=method, adapter={**PREDATING, **ours}).identity()
    if refusal is None:
        assert load_checkpoint(tmp_path, identity)[2] == 1
    else:
        with pytest.raises(CheckpointError, match=f"another run: {refusal}"):
            load_checkpoint(tmp_path, identity)


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {}, {"lr": 1e-3})
    manifest = next(tmp_path.glob("step-*/manifest.json"))
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": CHECKPOINT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="newer than this dynlora reads.*upgrade dynlora"):
        load_checkpoint(tmp_path, {"lr": 1e-3})


def test_a_format_9_run_that_set_the_input_normalisation_while_it_was_off_resumes_with_the_defaults(tmp_path):
    # Such settings never acted (the normalisation was off); a run now refuses them, so they migrate to the defaults.
    ours = TrainSettings(method="dynamic", adapter={"input_adaptive": "per_example"}).identity()
    theirs = {**ours, "adapter": {**ours["adapter"], "input_norm_every": 5, "input_norm_strength": 0.5}}
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, {"peak": 0}, theirs)
    manifest = next(tmp_path.glob("step-*/manifest.json"))
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 9}))
    assert load_checkpoint(tmp_path, ours)[2] == 1
    on = TrainSettings(method="dynamic", adapter={"input_adaptive": "mergeable", "input_norm_every": 5}).identity()
    save_checkpoint(tmp_path / "on", 1, {"w": torch.ones(3)}, {"peak": 0}, on)
    manifest = next((tmp_path / "on").glob("step-*/manifest.json"))
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 9}))
    with pytest.raises(CheckpointError, match=r"adapter\.input_norm_every was 5, now 10"):  # it acted: kept
        load_checkpoint(tmp_path / "on", {**on, "adapter": {**on["adapter"], "input_norm_every": 10}})
