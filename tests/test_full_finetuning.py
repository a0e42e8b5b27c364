"""Full fine-tuning (``--method full``), the ceiling: every weight trains, the run saves a plain transformers model
that eval and generate load as it is, a tied output layer checkpoints and resumes exactly, and what it cannot do
(merge, export, a quantised base, --fsdp, LoRA+) is one clear line; two processes train as one."""

import json
import os
import signal

import pytest
import torch
from conftest import save_tiny_llama, tiny_llama
from helpers import chat_file, csv_data, dynlora, quick, run_cli, train_args
from helpers import ok as run
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from dynlora import DynamicLoRAConfig
from dynlora.training.errors import Interrupted
from dynlora.training.loop import TrainingRun
from dynlora.training.methods import get_method
from dynlora.training.settings import TrainSettings


def test_a_classifier_trains_every_weight_and_saves_a_model_that_loads_as_it_is(capsys, tmp_path, tiny_model_dir):
    train = csv_data(tmp_path / "data", ["pos", "neg"])
    out = tmp_path / "run"
    printed = run(capsys, *train_args(tiny_model_dir, train, out, "--method", "full", "--lr", "1e-3"))
    every = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).parameters())
    assert f"{every:,} trainable parameters (every weight, no adapter)" in printed
    assert json.loads((out / "results.json").read_text())["trainable_parameters"] == every
    before = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(out / "adapter")  # a plain transformers model
    AutoTokenizer.from_pretrained(out / "adapter")  # with its tokenizer
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert {"bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight"} <= changed  # not only a head
    assert after.config.id2label == {0: "neg", 1: "pos"}  # its classes, as the run named them
    accuracy = json.loads((out / "results.json").read_text())["metrics"]["validation"]["accuracy"]
    evaluated = run(capsys, "eval", "--adapter", out / "adapter", "--dev-file", train, "--max-length", 32)
    assert f"accuracy {accuracy:.4f}" in evaluated  # the run's own evaluation, from the saved model
    line = run_cli(capsys, "eval", "--adapter", out / "adapter", "--task", "stsb")  # a one-output regression task
    assert "has a head of 2 outputs and this task needs 1: evaluate it on the task" in line
    for command, flag in (("merge", "--out"), ("export", "--peft")):
        line = run_cli(capsys, command, "--adapter", out / "adapter", flag, tmp_path / command)
        says = "is a whole model (trained with --method full, or merged), not an adapter: there is nothing to"
        assert f"{says} {command}" in line
        assert not (tmp_path / command).exists()


def _hooked_run(settings: TrainSettings, interrupt_at: int | None) -> TrainingRun:
    """A run whose model receives SIGINT during the forward of micro-batch ``interrupt_at`` (None: never)."""
    run = TrainingRun(settings)
    count = [0]

    def hook(module, args, kwargs):
        if module.training:
            if count[0] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            count[0] += 1

    run.model.register_forward_pre_hook(hook, with_kwargs=True)
    return run


def test_a_tied_language_model_checkpoints_resumes_exactly_evaluates_and_generates(capsys, tmp_path):
    model = save_tiny_llama(tmp_path / "tied", tied=True)
    train = chat_file(tmp_path / "chat.jsonl")

    def settings(out, **extra) -> TrainSettings:
        return TrainSettings(
            model=model, train_file=str(train), dev_file=str(train), method="full", max_steps=6, batch_size=4,
            max_length=64, lr=1e-3, output_dir=str(out), progress=False, **extra,
        )  # fmt: skip

    straight = _hooked_run(settings(tmp_path / "a"), None).run()
    with pytest.raises(Interrupted, match="--resume"):
        _hooked_run(settings(tmp_path / "b"), interrupt_at=3).run()
    resumed = _hooked_run(settings(tmp_path / "b", resume=True), None).run()
    assert resumed["metrics"] == straight["metrics"]
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / r / "adapter") for r in "ab")
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # still tied when loaded
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    loss = straight["metrics"]["validation"]["loss"]
    assert f"loss {loss:.4f}" in run(capsys, "eval", "--adapter", tmp_path / "a" / "adapter", "--dev-file", train)
    prompt = ["--prompt", "what is 3 plus one", "--max-new-tokens", 6]
    ours = run(capsys, "generate", "--adapter", tmp_path / "a" / "adapter", *prompt)
    assert ours == run(capsys, "generate", "--model", tmp_path / "a" / "adapter", *prompt)  # it is a plain model


def test_a_bf16_checkpoint_trains_float32_weights():
    adapted = get_method("full").wrap(tiny_llama().to(torch.bfloat16), DynamicLoRAConfig(), 10)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in adapted.model.parameters())
    assert adapted.trainable_parameters() == sum(p.numel() for p in tiny_llama().parameters())


def test_full_fine_tuning_runs_at_a_whole_model_learning_rate_unless_told():
    assert TrainSettings(method="full").lr == 2e-5 and TrainSettings().lr == 5e-4  # an adapter's would wreck it
    assert TrainSettings(method="full", lr=1e-4).lr == 1e-4


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--load-in-4bit"], "--method full trains every weight, which a 4- or 8-bit base cannot hold"),
        (["--fsdp"], "--fsdp shards the frozen base, and --method full freezes nothing"),
        (["--loraplus-lr-ratio", "16"], "--loraplus-lr-ratio speeds up the adapters' B, and --method full has none"),
    ],
)
def test_what_full_fine_tuning_cannot_do_is_one_line_before_anything_loads(capsys, tmp_path, flags, says):
    out = tmp_path / "run"
    line = run_cli(capsys, *quick("no-such-model", chat_file(tmp_path / "c.jsonl"), out, "--method", "full", *flags))
    assert says in line and not out.exists()


def test_two_processes_fine_tune_every_weight_as_one_process_on_the_whole_batch(tmp_path):
    """torchrun, two gloo processes at batch 4 each, against one at batch 8: the same whole model (a classifier's
    mean loss per example weighs every process's half alike; Llama has no dropout to draw differently)."""
    train = csv_data(tmp_path / "data", ["pos", "neg"], n=32)
    model = save_tiny_llama(tmp_path / "llama", chat_template=None)
    common = ["train", "--model", model, "--train-file", train, "--dev-file", train, "--objective", "classify"]
    common += ["--method", "full", "--max-steps", 3, "--max-length", 32, "--lr", "1e-3", "--no-progress"]
    torchrun = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dynlora.cli")
    one = dynlora(*common, "--batch-size", 8, "--output-dir", tmp_path / "one")
    two = dynlora(*common, "--batch-size", 4, "--output-dir", tmp_path / "two", module=torchrun)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    alone, shared = (load_file(tmp_path / run / "adapter" / "model.safetensors") for run in ("one", "two"))
    base = load_file(next((tmp_path / "llama").glob("*.safetensors")))
    assert alone.keys() == shared.keys() and any(not torch.equal(alone[k], base[k]) for k in base if k in alone)
    for name, tensor in alone.items():
        torch.testing.assert_close(shared[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
