"""The training loop: outputs, every method, exact resume after SIGINT, and checkpoint errors."""

import json
import os
import signal

import pytest
import torch
from helpers import GLUE, needs_glue

from dynlora import DynamicLoRAModel
from dynlora.training.base_model import center_regression_head, load_base
from dynlora.training.errors import CheckpointError, Diverged, Interrupted
from dynlora.training.loop import TrainingRun, train
from dynlora.training.settings import TrainSettings
from dynlora.training.tasks import load_task

pytestmark = needs_glue


def config(model_dir, out, **overrides):
    base = dict(
        task="rte",
        model=model_dir,
        data_dir=str(GLUE),
        max_steps=12,
        batch_size=8,
        max_length=48,
        max_train_samples=160,
        max_eval_samples=48,
        lr=5e-3,
        output_dir=str(out),
        progress=False,
        adapter={"rank": 4, "warmup": 0.25, "interval": 0.25, "final": 0.75},
    )
    return TrainSettings(**{**base, **overrides})


def test_a_run_writes_results_log_best_and_a_loadable_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result = train(config(tiny_model_dir, tmp_path, eval_every=6))
    assert result["steps"] == 12 and 0 <= result["metrics"]["validation"]["accuracy"] <= 1
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = [r.get("event") for r in records]
    assert events[0] == "start" and events.count("eval") == 2 and events.count("allocation") == 3
    assert json.loads((tmp_path / "results.json").read_text())["method"] == "dynamic"
    assert (tmp_path / "best" / "metrics.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    loaded = DynamicLoRAModel.from_pretrained(base, tmp_path / "adapter")
    assert loaded.rank_pattern() == result["ranks"]
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))  # tensorboard is in the test extra


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_the_learning_rate_decays_to_zero_or_holds_its_peak_after_the_warm_up(tiny_model_dir, tmp_path, schedule):
    train(config(tiny_model_dir, tmp_path, method="lora", lr_schedule=schedule, warmup_ratio=0.25, log_every=1))
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert len(lrs) == 12 and lrs[:3] == pytest.approx([5e-3 / 3, 2 * 5e-3 / 3, 5e-3])  # 3 warm-up steps
    assert lrs[3:] == pytest.approx([5e-3] * 9 if schedule == "constant" else [5e-3 * (8 - k) / 9 for k in range(9)])


@pytest.mark.parametrize("method", ["lora", "peft-lora", "peft-adalora", "peft-rslora", "peft-loraplus", "peft-eva"])
def test_every_method_trains_at_the_same_budget(tiny_model_dir, tmp_path, method):
    dynamic = TrainingRun(config(tiny_model_dir, tmp_path / "d", max_steps=4)).adapted.model
    dynamic = dynamic.budget_trainable_parameters()  # its start is pruned to it
    result = train(config(tiny_model_dir, tmp_path / method, method=method, max_steps=4))
    assert result["method"] == method and result["steps"] == 4
    if method == "peft-adalora":  # starts at 1.5 x rank and prunes to rank: more parameters until then
        assert result["trainable_parameters"] > dynamic
    else:
        assert result["trainable_parameters"] == dynamic


def hooked(settings: TrainSettings, on_training_forward) -> TrainingRun:
    """A run whose base model calls ``on_training_forward(k, kwargs)`` before its k-th training forward (k = the
    micro-batch index): real signals and real non-finite batches, through the model the run is handed."""
    task = load_task(settings)
    base = task.load_model(settings.model)
    count = [0]

    def hook(module, args, kwargs):
        if module.training:
            on_training_forward(count[0], kwargs)
            count[0] += 1

    base.model.register_forward_pre_hook(hook, with_kwargs=True)
    return TrainingRun(settings, task=task, base=base)


def _interrupted_then_resumed(model_dir, out, at_step, **overrides):
    def interrupt(k, _kwargs):
        if k == at_step - 1:  # the micro-batch of step `at_step` (one per step): SIGINT lands during that step
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match="--resume"):
        hooked(config(model_dir, out, **overrides), interrupt).run()
    assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step-{at_step:08d}"
    return train(config(model_dir, out, resume=True, **overrides))


def test_resume_after_sigint_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = train(config(tiny_model_dir, tmp_path / "a"))
    resumed = _interrupted_then_resumed(tiny_model_dir, tmp_path / "b", at_step=6)
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["ranks"] == straight["ranks"]
    a = DynamicLoRAModel.from_pretrained
    from transformers import AutoModelForSequenceClassification

    def adapter(run):
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        return a(base, tmp_path / run / "adapter").adapter_state_dict()

    sa, sb = adapter("a"), adapter("b")
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    log_steps = [s for s in steps if s % 10 == 0 and s > 0]
    assert len(log_steps) == len(set(log_steps))  # the resumed run did not log steps twice


def test_an_over_parameterised_run_resumed_equals_an_uninterrupted_one_and_reports_its_final_and_peak_size(
    tiny_model_dir, tmp_path
):
    adapter = {"rank": 4, "warmup": 0.25, "interval": 0.25, "final": 0.75, "start_ratio": 1.5}
    straight = train(config(tiny_model_dir, tmp_path / "a", adapter=adapter))
    resumed = _interrupted_then_resumed(tiny_model_dir, tmp_path / "b", at_step=6, adapter=adapter)
    assert resumed["metrics"] == straight["metrics"] and resumed["ranks"] == straight["ranks"]
    layers = len(straight["ranks"])  # query and value of every block: one cost per rank
    assert sum(straight["ranks"].values()) <= 4 * layers  # pruned to the budget by the last re-allocation
    for result in (straight, resumed):
        pruned = 6 * layers - sum(result["ranks"].values())  # every layer started at round(1.5 x 4) = 6
        # a rank of a 32-wide tiny model's projection is 32 + 32 parameters
        assert result["peak_trainable_parameters"] - result["trainable_parameters"] == pruned * 2 * 32 > 0


def test_a_lora_ga_run_resumed_on_a_fresh_base_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    adapter = {"rank": 4, "warmup": 0.25, "interval": 0.25, "final": 0.75, "init": "lora-ga"}
    straight = train(config(tiny_model_dir, tmp_path / "a", adapter=adapter))
    resumed = _interrupted_then_resumed(tiny_model_dir, tmp_path / "b", at_step=6, adapter=adapter)
    assert resumed["metrics"] == straight["metrics"] and resumed["ranks"] == straight["ranks"]


def test_adalora_resumed_after_its_budget_is_fixed_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    # 12 steps: AdaLoRA fixes its budget at step 10 and masks with it after; stop at 11, past that point.
    straight = train(config(tiny_model_dir, tmp_path / "a", method="peft-adalora"))
    resumed = _interrupted_then_resumed(tiny_model_dir, tmp_path / "b", at_step=11, method="peft-adalora")
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["ranks"] == straight["ranks"] and sum(resumed["ranks"].values()) < 6 * 2 * 4


def test_checkpoint_errors(tiny_model_dir, tmp_path):
    train(config(tiny_model_dir, tmp_path, max_steps=3))
    events = sorted((tmp_path / "tensorboard").iterdir())
    with pytest.raises(ValueError, match="already holds a run"):
        train(config(tiny_model_dir, tmp_path, max_steps=3))
    assert sorted((tmp_path / "tensorboard").iterdir()) == events  # a refused run writes nothing into the run
    with pytest.raises(CheckpointError, match="another run: lr"):
        train(config(tiny_model_dir, tmp_path, max_steps=3, lr=1e-4, resume=True))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(config(tiny_model_dir, tmp_path / "fresh", resume=True))
    weights = tmp_path / "checkpoints" / "step-00000003" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="damaged: weights.safetensors"):
        train(config(tiny_model_dir, tmp_path, max_steps=3, resume=True))


def poisoned(settings: TrainSettings, bad) -> TrainingRun:
    """NaN regression targets on the micro-batches in ``bad``: a real non-finite loss, not a mocked one."""

    def poison(k, kwargs):
        if bad(k):
            kwargs["labels"] = torch.full_like(kwargs["labels"], float("nan"))

    return hooked(settings, poison)


def test_nonfinite_steps_are_skipped_counted_and_kept_from_the_allocator(tiny_model_dir, tmp_path):
    run = poisoned(config(tiny_model_dir, tmp_path, task="stsb", max_steps=8), lambda k: k in (2, 5))
    result = run.run()
    assert result["steps"] == 8 and result["skipped_nonfinite_steps"] == 2 and run.micro == 10
    assert run.model.engine.scorer.skipped_nonfinite == 0  # the scorer never saw the NaN steps
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    events = [json.loads(line).get("event") for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert events.count("skipped_nonfinite") == 2


def test_too_many_nonfinite_steps_stop_and_keep_the_last_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(Diverged, match="not finite for 5 steps in a row"):
        poisoned(config(tiny_model_dir, tmp_path, task="stsb", max_steps=8, save_every=2), lambda k: k >= 3).run()
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step-00000002"
    resumed = train(config(tiny_model_dir, tmp_path, task="stsb", max_steps=8, save_every=2, resume=True))
    assert resumed["steps"] == 8


def test_a_fresh_run_keeps_a_dead_runs_log_aside(tiny_model_dir, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / ".dynlora-run").write_text("")  # what a run killed before its first checkpoint leaves
    (tmp_path / "log.jsonl").write_text('{"step": 0, "event": "start"}\n{"step": 10, "loss": 0.7}\n')
    train(config(tiny_model_dir, tmp_path, max_steps=3))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 3 and steps.count(0) == 1
    assert "0.7" in (tmp_path / "log.previous.jsonl").read_text()


def test_a_new_regression_head_starts_at_the_label_mean_and_a_loaded_one_is_kept(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    loaded = load_base(tiny_model_dir, 1, regression=True)  # the saved 2-class head does not fit: new
    base, fresh = loaded.model, loaded.fresh
    assert "classifier.bias" in fresh
    assert center_regression_head(base, fresh, 2.7)
    assert base.classifier.bias.item() == pytest.approx(2.7)

    base.save_pretrained(tmp_path / "regressor")  # a model whose regression head was trained: left alone
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "regressor")
    reloaded = load_base(str(tmp_path / "regressor"), 1, regression=True)
    loaded, fresh = reloaded.model, reloaded.fresh
    assert not fresh and not center_regression_head(loaded, fresh, 1.0)
    assert loaded.classifier.bias.item() == pytest.approx(2.7)

    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_labels=1,
        )
    )
    assert not center_regression_head(llama, {"score.weight"}, 2.7)  # its score layer has no bias


def test_stsb_training_starts_from_the_label_mean(tiny_model_dir, tmp_path):
    run = TrainingRun(config(tiny_model_dir, tmp_path / "run", task="stsb"))
    labels = [f["labels"] for f in run.train_features]
    assert run.model.model.classifier.bias.item() == pytest.approx(sum(labels) / len(labels), rel=1e-5)
