"""Reliability round 3, an LLM user's run (docs/reliability.md): each test failed before its fix."""

import importlib.metadata
import json
import re
import warnings

import pytest
from test_cli_errors import run_cli

import dynlora
from dynlora import cli
from dynlora.cli import main


def test_the_installed_version_is_the_package_version():
    assert importlib.metadata.version("dynlora") == dynlora.__version__


def test_a_ctrl_c_outside_a_training_step_says_interrupted_once_without_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_eval", interrupted)
    assert main(["eval", "--task", "sst2"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: stopped at once" in err and "again" not in err and "Traceback" not in err


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
    from test_language_models import quick
    from test_user_faults import ok as run

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
    from test_language_models import chat_file
    from test_user_faults import ok as run

    train = chat_file(tmp_path / "chat.jsonl")
    args = ["compare", "--model", tiny_chat_lm_dir, "--train-file", train, "--dev-file", train, "--methods", "lora"]
    args += ["--seeds", "0", "--max-steps", 2, "--batch-size", 4, "--max-length", 64, "--rank", 2]
    printed = run(capsys, *args, "--target-modules", "all-linear", "--output-dir", tmp_path / "c", "--no-progress")
    assert "| chat.jsonl (loss, lower is better) |" in printed and "sst2" not in printed
    (row,) = [line for line in printed.splitlines() if line.startswith("| lora |")]
    loss = json.loads((tmp_path / "c" / "results.jsonl").read_text())["metrics"]["validation"]["loss"]
    assert f"{loss:.2f} ± 0.00 (n=1)" in row and (tmp_path / "c" / "chat.jsonl" / "lora" / "seed0").is_dir()


def test_an_empty_language_model_dev_file_is_called_empty(capsys, tmp_path, tiny_chat_lm_dir):
    from test_language_models import chat_file, quick

    train, dev = chat_file(tmp_path / "chat.jsonl"), tmp_path / "dev.jsonl"
    dev.write_text("")
    args = quick(tiny_chat_lm_dir, train, tmp_path / "run")
    args[args.index("--dev-file") + 1] = dev
    assert f"--dev-file {dev} is empty" in run_cli(capsys, *args)


def test_a_training_file_edited_before_resume_is_refused(capsys, tmp_path, tiny_chat_lm_dir):
    from test_language_models import chat_file, quick
    from test_user_faults import ok as run

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
    from test_language_models import chat_file, quick
    from test_user_faults import ok as run

    train = chat_file(tmp_path / "chat.jsonl")
    args = quick(tiny_chat_lm_dir, train, tmp_path / "run")
    del args[args.index("--target-modules") : args.index("--target-modules") + 2]  # no target given
    printed = run(capsys, *args)
    assert printed.splitlines()[0].startswith(f"dynamic on {train} ({tiny_chat_lm_dir}, lm, chat data): ")
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
    assert ranks["model.layers.0.mlp.shared_expert_gate"] == 1 and ranks["model.layers.0.self_attn.q_proj"] == 4
    with pytest.raises(ValueError, match="rank 4 is larger than layer"):  # a rank asked of that layer by name
        get_dynlora_model(Qwen2MoeForCausalLM(config), DynamicLoRAConfig(rank=4, target_modules=["shared_expert_gate"]))


def test_an_interrupted_comparison_of_the_previous_format_resumes(capsys, tmp_path, tiny_chat_lm_dir):
    from test_language_models import chat_file
    from test_user_faults import ok as run

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
