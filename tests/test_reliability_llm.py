"""Reliability round 3, an LLM user's run (docs/reliability.md): each test failed before its fix."""

import importlib.metadata
import io
import json
import os
import pty
import re
import subprocess
import sys
import warnings

import pytest
from helpers import run_cli

import dynlora
from dynlora import cli
from dynlora.cli import main
from dynlora.training import commands


def test_the_installed_version_is_the_package_version():
    assert importlib.metadata.version("dynlora") == dynlora.__version__


def test_a_ctrl_c_outside_a_training_step_says_interrupted_once_without_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_eval", interrupted)
    assert main(["eval", "--task", "sst2"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: stopped at once" in err and "again" not in err and "Traceback" not in err


def test_a_ctrl_c_while_torch_and_transformers_import_is_the_same_one_line(capsys, monkeypatch):
    def interrupted(name, package=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert main(["train"]) == 130
    err = capsys.readouterr().err
    assert err.strip().startswith("interrupted: stopped at once") and "Traceback" not in err


HEAVY = ("torch", "transformers", "peft", "sklearn", "scipy", "matplotlib")


def test_help_and_a_mistyped_flag_answer_before_torch_is_imported():
    code = f"""
import sys
from dynlora.cli import main
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["train", "--learning-rate", "1"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]", done.stdout[-500:]
    assert "unrecognized arguments: --learning-rate" in done.stderr


def test_on_a_terminal_a_command_says_at_once_that_it_is_loading_then_erases_the_line(tmp_path):
    # A real terminal (a pty) as stderr; -X importtime writes each import to that same stream, in order.
    leader, follower = pty.openpty()
    command = [sys.executable, "-X", "importtime", "-m", "dynlora.cli", "eval", "--adapter", str(tmp_path / "gone")]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the command ends
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) == 2
    os.close(leader)
    err = b"".join(chunks).decode()
    torch_imported = re.search(r"\| +torch\r?\n", err).start()
    status = err.index("dynlora: loading torch and transformers ...")
    assert status < torch_imported < err.index("\r\x1b[K") < err.index("error: ")


def test_under_torchrun_only_the_first_process_prints_an_error(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--task", "colaa"]) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_cli(capsys, "train", "--task", "colaa").startswith("error: unknown GLUE task 'colaa'")


def test_own_data_with_no_length_given_trains_one_epoch_and_a_glue_task_its_quick_steps():
    from dynlora.training.settings import QUICK_STEPS, TrainSettings

    assert TrainSettings.from_settings({"train_file": "x.jsonl"}).max_steps == 0  # --epochs' default: 1.0
    assert TrainSettings.from_settings({"train_file": "x.jsonl"}).epochs == 1.0
    assert TrainSettings.from_settings({"task": "rte"}).max_steps == QUICK_STEPS
    # one default whatever the entry point: the dataclass itself, a config file, the command line
    assert TrainSettings().max_steps == QUICK_STEPS and TrainSettings(train_file="x.jsonl").max_steps == 0
    assert TrainSettings(epochs=2.0).max_steps == 0 and TrainSettings().epochs == 1.0


def chat_line(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"


def test_an_assistant_turn_cut_by_max_length_is_an_error_not_a_silent_cut(tmp_chat_tok):
    from dynlora.training.data.lm import chat_features
    from dynlora.training.errors import DataError

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 40}]
    with pytest.raises(DataError, match="x: an assistant turn .* does not fit in --max-length 16 tokens"):
        chat_features(messages, tmp_chat_tok, 16, "x")
    assert chat_features(messages, tmp_chat_tok, 128, "x")  # it fits: no error


@pytest.mark.parametrize("role", ["robot", "assistent"])
def test_an_unknown_or_misspelled_chat_role_is_an_error_naming_it(tmp_chat_tok, role):
    from dynlora.training.data.lm import chat_features
    from dynlora.training.errors import DataError

    messages = [
        {"role": "user", "content": "hi"},
        {"role": role, "content": "x"},
        {"role": "assistant", "content": "y"},
    ]
    with pytest.raises(DataError, match=f"x: unknown role '{role}'; a turn's role is one of system, user, assistant"):
        chat_features(messages, tmp_chat_tok, 128, "x")


def test_sharegpt_conversations_are_chat_data(tmp_path, tmp_chat_tok):
    from dynlora.training.data.lm import IGNORE, lm_features, lm_format

    path = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    assert lm_format(path) == "chat"
    (feature,) = lm_features(path, tmp_chat_tok, 64)
    learned = [t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != IGNORE]
    assert tmp_chat_tok.decode(learned) == "yo <|im_end|>"  # the gpt turn, as the assistant's


def test_a_long_rte_passage_is_cut_the_same_way_in_training_and_evaluation(tmp_chat_tok):
    from dynlora.training.data.glue import Example, task_spec
    from dynlora.training.data.instruct import conversation, fitted
    from dynlora.training.data.lm import chat_features

    spec = task_spec("rte")
    example = Example("a very long passage " * 30, "the short hypothesis", 0)
    cut = fitted(spec, example, tmp_chat_tok, 64)
    feature = chat_features(conversation(spec, cut), tmp_chat_tok, 64, "x")  # fits: no error
    assert len(feature["input_ids"]) <= 64 and cut.text_pair == example.text_pair and cut.label == 0
    assert example.text.startswith(cut.text.strip()) and len(cut.text) < len(example.text)  # only the passage is cut
    short = Example("short", "hyp", 1)
    assert fitted(spec, short, tmp_chat_tok, 64) == short


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
        (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    ],
)
def test_generate_refuses_a_temperature_or_length_it_cannot_honour(capsys, flags, message):
    assert message in run_cli(capsys, "generate", "--prompt", "hi", *flags)


def test_generate_refuses_more_new_tokens_than_the_model_has_positions(capsys, tiny_chat_lm_dir):
    line = run_cli(capsys, "generate", "--model", tiny_chat_lm_dir, "--prompt", "hi", "--max-new-tokens", 100000000)
    assert "would pass the model's 256 positions; lower --max-new-tokens to at most" in line


def test_generate_answers_a_conversation_with_a_system_message(capsys, tmp_path, tiny_chat_lm_dir):
    from dynlora.training.generation import conversation

    path = tmp_path / "conv.json"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                {"role": "user", "content": "and now"}]))  # fmt: skip
    turns = conversation(None, str(path), "be brief")
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    code = main(["generate", "--model", tiny_chat_lm_dir, "--messages", str(path), "--system", "be brief",
                 "--max-new-tokens", "3"])  # fmt: skip
    assert code == 0
    assert "the last turn must be the user's" in run_cli(
        capsys, "generate", "--model", tiny_chat_lm_dir, "--messages", _write(tmp_path / "b.json", turns[:3])
    )


def _write(path, turns) -> str:
    path.write_text(json.dumps(turns))
    return str(path)


def test_eval_uses_the_runs_max_length_and_generate_continues_a_text_adapter(capsys, tmp_path, tiny_chat_lm_dir,
                                                                              monkeypatch):  # fmt: skip
    from helpers import ok as run
    from helpers import quick

    from dynlora.training.run_facts import read_run_facts

    train = tmp_path / "docs.jsonl"
    train.write_text("".join(json.dumps({"text": f"line {i} " * 30}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    run(capsys, *quick(tiny_chat_lm_dir, train, out, "--method", "lora"))  # --max-length 64
    assert read_run_facts(out / "adapter") == {"prompt_format": "documents", "max_length": 64}
    trained = json.loads((out / "results.json").read_text())["metrics"]["validation"]["loss"]
    assert f"loss {trained:.4f}" in run(capsys, "eval", "--adapter", out / "adapter", "--dev-file", train)
    assert f"loss {trained:.4f}" not in run(
        capsys, "eval", "--adapter", out / "adapter", "--dev-file", train, "--max-length", 16
    )
    from dynlora.training import generation

    seen = {}
    real = generation.model_inputs

    def spy(tok, turns, chat, positions, max_new_tokens):
        seen["chat"] = chat
        return real(tok, turns, chat, positions, max_new_tokens)

    monkeypatch.setattr(generation, "model_inputs", spy)
    run(capsys, "generate", "--adapter", out / "adapter", "--prompt", "line 3", "--max-new-tokens", 2)
    assert seen["chat"] is False  # a text adapter continues the text, though the model has a chat template


def test_compare_on_own_data_names_the_file_and_shows_the_loss(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import chat_file
    from helpers import ok as run

    train = chat_file(tmp_path / "chat.jsonl")
    args = ["compare", "--model", tiny_chat_lm_dir, "--train-file", train, "--dev-file", train, "--methods", "lora"]
    args += ["--seeds", "0", "--max-steps", 2, "--batch-size", 4, "--max-length", 64, "--rank", 2]
    printed = run(capsys, *args, "--target-modules", "all-linear", "--output-dir", tmp_path / "c", "--no-progress")
    assert "| chat.jsonl (loss, lower is better) |" in printed and "sst2" not in printed
    (row,) = [line for line in printed.splitlines() if line.startswith("| lora |")]
    loss = json.loads((tmp_path / "c" / "results.jsonl").read_text())["metrics"]["validation"]["loss"]
    assert f"{loss:.2f} ± 0.00 (n=1)" in row and (tmp_path / "c" / "chat.jsonl" / "lora" / "seed0").is_dir()


def test_an_empty_language_model_dev_file_is_called_empty(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import chat_file, quick

    train, dev = chat_file(tmp_path / "chat.jsonl"), tmp_path / "dev.jsonl"
    dev.write_text("")
    args = quick(tiny_chat_lm_dir, train, tmp_path / "run")
    args[args.index("--dev-file") + 1] = dev
    assert f"--dev-file {dev} is empty" in run_cli(capsys, *args)


def test_a_training_file_edited_before_resume_is_refused(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import chat_file, quick
    from helpers import ok as run

    train = chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    run(capsys, *quick(tiny_chat_lm_dir, train, out, "--method", "lora"))
    chat_file(train, n=12)  # fewer examples: another run's data
    line = run_cli(capsys, "train", "--output-dir", out, "--resume")
    assert f"{train} has changed since checkpoint" in line and "put the file back as it was" in line


def test_a_run_saved_before_the_pooler_was_trained_resumes_with_it_frozen():
    from dynlora.training.settings import resumed_settings

    old = {"task": "rte", "method": "lora", "max_steps": 4, "adapter": {"rank": 2}}  # its config.json had no such key
    settings, _ = resumed_settings(old, {}, "runs/x")
    assert settings.adapter.train_untrained_pooler is False
    new = {**old, "adapter": {"rank": 2, "train_untrained_pooler": True}}
    assert resumed_settings(new, {}, "runs/x")[0].adapter.train_untrained_pooler is True


def test_a_language_model_run_adapts_every_linear_layer_and_names_what_it_trains(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import chat_file, quick
    from helpers import ok as run

    train = chat_file(tmp_path / "chat.jsonl")
    args = quick(tiny_chat_lm_dir, train, tmp_path / "run")
    del args[args.index("--target-modules") : args.index("--target-modules") + 2]  # no target given
    printed = run(capsys, *args)
    named = f"({tiny_chat_lm_dir}, lm, chat data, batches of 4 x up to 64 tokens)"  # quick's sizes
    assert printed.splitlines()[0].startswith(f"dynamic on {train} {named}: ")
    ranks = json.loads((tmp_path / "run" / "results.json").read_text())["ranks"]
    assert {name.rsplit(".", 1)[-1] for name in ranks} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}  # fmt: skip


def test_all_linear_adapts_a_layer_narrower_than_the_rank_at_its_width_and_says_so():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from dynlora import DynamicLoRAConfig, get_dynlora_model

    sizes = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = Qwen2MoeConfig(**sizes, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, shared_expert_intermediate_size=32)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_dynlora_model(Qwen2MoeForCausalLM(config), DynamicLoRAConfig(rank=4, target_modules="all-linear"))
    said = " | ".join(str(w.message) for w in caught)
    assert re.search(r"all-linear: 2 layer\(s\) narrower than rank 4 .*shared_expert_gate \(32 -> 1\)", said)
    ranks = model.rank_pattern()
    # The default start (1.5 x rank 4) stops at the narrow layer's width.
    assert ranks["model.layers.0.mlp.shared_expert_gate"] == 1 and ranks["model.layers.0.self_attn.q_proj"] == 6
    with pytest.raises(ValueError, match="rank 4 is larger than layer"):  # a rank asked of that layer by name
        get_dynlora_model(Qwen2MoeForCausalLM(config), DynamicLoRAConfig(rank=4, target_modules=["shared_expert_gate"]))


def test_an_interrupted_comparison_of_the_previous_format_resumes(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import chat_file
    from helpers import ok as run

    from dynlora.training.settings import as_saved

    train = chat_file(tmp_path / "chat.jsonl")
    args = ["compare", "--model", tiny_chat_lm_dir, "--train-file", train, "--dev-file", train, "--methods", "lora"]
    args += ["--seeds", "0", "--max-steps", 4, "--save-every", 2, "--batch-size", 4, "--max-length", 64, "--rank", 2]
    args += ["--output-dir", tmp_path / "c", "--no-progress"]
    run(capsys, *args)
    done = tmp_path / "c" / "chat.jsonl" / "lora" / "seed0"
    # As the previous dynlora left it: format 6, neither new setting recorded, and not finished.
    config = json.loads((done / "config.json").read_text())
    del config["adapter"]["train_untrained_pooler"], config["lr_schedule"]
    (done / "config.json").write_text(json.dumps(config))
    for manifest in done.glob("checkpoints/step-*/manifest.json"):
        data = json.loads(manifest.read_text())
        del data["identity"]["adapter"]["train_untrained_pooler"], data["identity"]["lr_schedule"]
        manifest.write_text(json.dumps({**data, "format_version": 6}))
    (tmp_path / "c" / "results.jsonl").unlink()
    (done / "results.json").unlink()
    assert as_saved({"adapter": {"rank": 2}}, done)["adapter"] == {"rank": 2, "train_untrained_pooler": False}
    assert "| lora |" in run(capsys, *args)  # resumed from its checkpoint, not refused as another run's


def test_an_evaluation_shows_its_progress_on_a_terminal_only(capsys, tmp_path, tiny_chat_lm_dir, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(10)))
    command = ["eval", "--model", tiny_chat_lm_dir, "--dev-file", str(dev), "--batch-size", "4"]
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert main(command) == 0
        assert ("evaluating:" in stream.getvalue() and "/3 [" in stream.getvalue()) is shown, stream.getvalue()
        assert "loss" in capsys.readouterr().out  # the results go to stdout either way


def test_a_finished_run_is_extended_by_a_larger_max_steps_on_the_longer_runs_schedule(
    capsys, tmp_path, tiny_chat_lm_dir
):
    from helpers import chat_file, quick
    from helpers import ok as run

    from dynlora.cli import build_parser
    from dynlora.training.commands import _train_settings
    from dynlora.training.loop import TrainingRun

    train = chat_file(tmp_path / "chat.jsonl")

    def lrs(out) -> dict[int, float]:
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in records if "lr" in r}

    longer, extended = tmp_path / "eight", tmp_path / "four-then-eight"
    run(capsys, *quick(tiny_chat_lm_dir, train, longer, "--log-every", 1), "--max-steps", 8)
    run(capsys, *quick(tiny_chat_lm_dir, train, extended, "--log-every", 1))  # 4 steps
    settings, _ = _train_settings(build_parser().parse_args(["train", "--output-dir", str(extended), "--resume",
                                                             "--max-steps", "8"]))  # fmt: skip
    resumed = TrainingRun(settings, extend=True)
    resumed.restore()  # step 5 is taken at the 8-step schedule's lr (the 8-step run logs it after step 4)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lrs(longer)[4], rel=1e-6)
    resumed.release()
    printed = run(capsys, "train", "--output-dir", extended, "--resume", "--max-steps", 8)
    assert "changed: max_steps 4 -> 8 (from here its schedules are those of a 8-step run)" in printed
    assert "dev metrics after 8 steps" in printed
    assert json.loads((extended / "results.json").read_text())["steps"] == 8
    assert {s: lr for s, lr in lrs(extended).items() if s > 4} == {s: lr for s, lr in lrs(longer).items() if s > 4}
    line = run_cli(capsys, "train", "--output-dir", extended, "--resume", "--max-steps", 6)
    assert "is at step 8, past the 6 steps asked for: extend it with --max-steps above 8" in line
    assert "had already finished" in run(capsys, "train", "--output-dir", extended, "--resume")


def test_a_language_model_left_without_sizes_gets_an_llms_batch_and_length_and_a_classifier_its_own(
    capsys, tmp_path, tiny_chat_lm_dir
):
    from helpers import chat_file, quick
    from helpers import ok as run
    from transformers import AutoConfig

    from dynlora.training.run_facts import read_run_facts
    from dynlora.training.settings import TrainSettings

    positions = AutoConfig.from_pretrained(tiny_chat_lm_dir).max_position_embeddings
    length = min(1024, positions)
    train = chat_file(tmp_path / "chat.jsonl")
    args = quick(tiny_chat_lm_dir, train, tmp_path / "run")
    for flag in ("--batch-size", "--max-length"):
        del args[args.index(flag) : args.index(flag) + 2]
    assert f"chat data, batches of 8 x up to {length} tokens): " in run(capsys, *args).splitlines()[0]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["batch_size"], saved["max_length"]) == (8, length)  # a resume reads them back as they ran
    assert read_run_facts(tmp_path / "run" / "adapter")["max_length"] == length
    classifier = TrainSettings().sized(language_model=False, positions=512)
    assert (classifier.batch_size, classifier.max_length) == (32, 128)
    given = TrainSettings(batch_size=3, max_length=40).sized(language_model=True, positions=8192)
    assert (given.batch_size, given.max_length) == (3, 40)
    assert TrainSettings().sized(language_model=True, positions=8192).max_length == 1024
