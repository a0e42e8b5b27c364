"""Language-model data and the `dynlora` command on a decoder: loss masking per format, GLUE as instructions,
train -> eval -> generate with the adapter, its merge and its PEFT export, and bad input in one line."""

import json

import pytest
import torch
from conftest import save_tiny_llama
from helpers import chat_file, quick, run_cli
from helpers import ok as run
from transformers import AutoModelForCausalLM, AutoTokenizer

from dynlora.training.answers import answer_scores, choose_answers
from dynlora.training.data.glue import Example, task_spec
from dynlora.training.data.instruct import INSTRUCTIONS, Instruction, conversation, instruction
from dynlora.training.data.lm import (
    IGNORE,
    chat_features,
    completion_features,
    lm_features,
    lm_format,
    text_features,
)
from dynlora.training.errors import DataError
from dynlora.training.evaluation import language_metrics


@pytest.fixture(scope="module")
def tok(tiny_chat_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_chat_lm_dir)


def learned(tok, feature) -> str:
    """The text of the tokens that carry loss."""
    return tok.decode([t for t, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != IGNORE])


def test_prompt_tokens_carry_no_loss_and_the_completion_ends_with_eos(tok):
    feature = completion_features({"prompt": "the capital of france is", "completion": "paris"}, tok, 64, "x")
    assert learned(tok, feature) == "paris [SEP]"
    prompt = tok("the capital of france is")["input_ids"]
    assert feature["input_ids"][: len(prompt)] == prompt and set(feature["labels"][: len(prompt)]) == {IGNORE}
    cut = completion_features({"prompt": "word " * 50, "completion": "paris"}, tok, 16, "x")
    assert len(cut["input_ids"]) == 16 and learned(tok, cut) == "paris [SEP]"  # the prompt's start is cut
    with pytest.raises(DataError, match="x: the completion is 21 tokens, more than --max-length 16"):
        completion_features({"prompt": "q", "completion": "word " * 20}, tok, 16, "x")


def test_only_the_assistant_turns_carry_loss(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "and now"},
        {"role": "assistant", "content": "bye"},
    ]
    feature = chat_features(messages, tok, 128, "x")
    assert learned(tok, feature) == "hi <|im_end|> bye <|im_end|>"  # each answer and its end of turn
    with pytest.raises(DataError, match="x: no assistant turn"):
        chat_features(messages[:2], tok, 128, "x")
    with pytest.raises(DataError, match="first assistant turn starts after --max-length 8"):
        chat_features(messages, tok, 8, "x")


def test_plain_text_is_packed_into_blocks_that_all_carry_loss(tok):
    blocks = text_features("to be or not to be " * 20, tok, 16, "x")
    assert all(len(b["input_ids"]) <= 16 for b in blocks) and len(blocks) == -(-121 // 16)
    assert all(b["labels"] == b["input_ids"] for b in blocks) and blocks[-1]["input_ids"][-1] == tok.eos_token_id


def test_a_glue_example_as_an_instruction_learns_only_its_answer_word(tok):
    spec = task_spec("rte")
    feature = chat_features(conversation(spec, Example("a cat sat", "an animal sat", 0)), tok, 128, "x")
    assert learned(tok, feature) == "yes <|im_end|>"  # entailment (label 0) answers yes


def by_hand_answer_scores(model, spec, example, tok, first_only: bool) -> list[float]:
    """Each label's answer log-likelihood, one unpadded sequence at a time: its first token, or all of its turn."""
    scores = []
    for label in range(len(instruction(spec).answers)):
        feature = chat_features(conversation(spec, Example(example.text, example.text_pair, label)), tok, 128, "x")
        logprobs = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(feature["labels"][1:])
        keep = (targets != IGNORE).nonzero().squeeze(-1)
        keep = keep[:1] if first_only else keep
        scores.append(logprobs[keep].gather(-1, targets[keep].unsqueeze(-1)).sum().item())
    return scores


def test_one_word_answers_are_chosen_by_their_first_token_after_one_pass_of_the_question(tiny_chat_lm_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir).eval()
    spec = task_spec("sst2")
    examples = [Example(t, None, 0) for t in ("a fine film", "dull", "great acting", "a long, slow, tedious story")]
    scores = answer_scores(model, tok, spec, examples, batch_size=3)  # padded batches of different lengths
    for example, row in zip(examples, scores.tolist(), strict=True):
        assert row == pytest.approx(by_hand_answer_scores(model, spec, example, tok, first_only=True), abs=1e-4)
    assert choose_answers(model, tok, spec, examples, batch_size=3) == scores.argmax(-1).tolist()


def test_answers_that_share_their_first_token_are_scored_whole(tiny_chat_lm_dir, tok, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir).eval()
    spec = task_spec("sst2")
    shared = Instruction("Is it good?", "Review", None, ("very bad", "very good"))  # one first token: "very"
    monkeypatch.setitem(INSTRUCTIONS, "sst2", shared)
    examples = [Example(t, None, 0) for t in ("a fine film", "dull", "great acting", "slow")]
    scores = answer_scores(model, tok, spec, examples, batch_size=3)
    for example, row in zip(examples, scores.tolist(), strict=True):
        assert row == pytest.approx(by_hand_answer_scores(model, spec, example, tok, first_only=False), abs=1e-4)


def test_a_language_dev_loss_is_the_mean_over_the_tokens_that_carry_one(tiny_chat_lm_dir, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir).eval()
    pairs = [("two plus two is", " four"), ("the sky is", " blue today"), ("a cat", " sat")]
    features = [completion_features({"prompt": p, "completion": c}, tok, 64, "x") for p, c in pairs]
    nll, count = 0.0, 0
    for feature in features:  # by hand: one sequence at a time, every token that carries a label
        logprobs = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(feature["labels"][1:])
        keep = targets != IGNORE
        nll -= logprobs[keep].gather(-1, targets[keep].unsqueeze(-1)).sum().item()
        count += int(keep.sum())
    metrics = language_metrics(model, features, batch_size=2, pad_token_id=tok.pad_token_id)  # padded batches
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5) and metrics["main"] == -metrics["loss"]


# --- through the command ---------------------------------------------------------------------------------------


def test_train_eval_and_generate_with_the_adapter_its_merge_and_its_peft_export(capsys, tmp_path, tiny_chat_lm_dir):
    train = chat_file(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    text = run(capsys, *quick(tiny_chat_lm_dir, train, out))
    assert "perplexity" in text and "final ranks" in text
    assert "pruned from" in text  # the default starts over-parameterised: its peak is said
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == str(train) and result["metrics"]["validation"]["perplexity"] > 1
    evaluated = run(capsys, "eval", "--adapter", out / "adapter", "--dev-file", train)
    assert f"loss {result['metrics']['validation']['loss']:.4f}" in evaluated  # the run's own evaluation
    run(capsys, "eval", "--adapter", out / "adapter", "--dev-file", train, "--predictions", tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and [r["index"] for r in rows] == list(range(16))  # one block per conversation
    mean = sum(r["loss_sum"] for r in rows) / sum(r["tokens"] for r in rows)
    assert mean == pytest.approx(result["metrics"]["validation"]["loss"], rel=1e-5)  # the blocks make the loss
    prompt = ["--prompt", "what is 3 plus one", "--max-new-tokens", 6]
    ours = run(capsys, "generate", "--adapter", out / "adapter", *prompt)
    run(capsys, "merge", "--adapter", out / "adapter", "--out", tmp_path / "merged")
    run(capsys, "export", "--adapter", out / "adapter", "--peft", tmp_path / "peft")
    assert run(capsys, "generate", "--model", tmp_path / "merged", *prompt) == ours
    assert run(capsys, "generate", "--adapter", tmp_path / "peft", *prompt) == ours
    assert ours.strip()  # it generated something


def test_text_jsonl_documents_are_cut_into_blocks_of_their_own_and_scored_per_document(
    capsys, tmp_path, tiny_chat_lm_dir
):
    docs = [" ".join(f"word{i}x{k}" for k in range(n)) for i, n in enumerate((3, 40, 7, 25))]
    train = tmp_path / "docs.jsonl"
    train.write_text("".join(json.dumps({"text": d, "source": "x"}) + "\n" for d in docs))
    tok = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    features = lm_features(train, tok, 64)  # as quick() trains and scores
    for i, doc in enumerate(docs):  # each document's blocks hold its tokens, and nothing of another's
        ids = sum((f["input_ids"] for f in features if f["document"] == i), [])
        whole = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == whole[: len(ids)] and len(whole) - len(ids) in (0, 1)  # a last 1-token block predicts nothing
    out = tmp_path / "run"
    run(capsys, *quick(tiny_chat_lm_dir, train, out, "--method", "lora"))
    predictions = ["--predictions", tmp_path / "p.jsonl", "--max-length", 64]
    run(capsys, "eval", "--adapter", out / "adapter", "--dev-file", train, *predictions)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["document"] for r in rows] == [f["document"] for f in features] and len(rows) > len(docs)
    labelled = tmp_path / "labelled.jsonl"  # a text with a label is a classifier's example, not a document
    labelled.write_text(json.dumps({"text": "good", "label": "pos"}) + "\n")
    assert lm_format(labelled) is None and lm_format(train) == "documents"


def test_a_glue_task_is_posed_as_an_instruction_to_a_chat_model(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import GLUE, needs_glue

    if not GLUE.is_dir():
        pytest.skip(needs_glue.kwargs["reason"])
    out = tmp_path / "run"
    args = [
        "train",
        "--model",
        tiny_chat_lm_dir,
        "--task",
        "rte",
        "--data-dir",
        GLUE,
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--max-train-samples",
        16,
        "--max-eval-samples",
        24,
        "--max-length",
        256,
        "--rank",
        2,
        "--output-dir",
        out,
        "--no-progress",
    ]
    text = run(capsys, *args)
    assert "accuracy" in text
    result = json.loads((out / "results.json").read_text())
    assert (
        result["labels"] == ["yes", "no"]
        and json.loads((out / "log.jsonl").read_text().splitlines()[0])["main_metric"] == "accuracy"
    )


def test_language_model_input_that_cannot_train_is_one_line(capsys, tmp_path, tiny_chat_lm_dir):
    no_answer = chat_file(tmp_path / "q.jsonl", assistant=False)
    assert "example 1: no assistant turn" in run_cli(capsys, *quick(tiny_chat_lm_dir, no_answer, tmp_path / "r"))
    plain = save_tiny_llama(tmp_path / "plain-llama", chat_template=None)
    chat = chat_file(tmp_path / "chat.jsonl")
    assert "has no chat template" in run_cli(capsys, *quick(plain, chat, tmp_path / "r"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "q", "completion": "word " * 100}) + "\n")
    assert "more than --max-length 64" in run_cli(capsys, *quick(tiny_chat_lm_dir, long, tmp_path / "r"))
    assert "cannot load a causal language model from 'no-such-model-xyz'" in run_cli(
        capsys, *quick("no-such-model-xyz", chat, tmp_path / "r")
    )
    assert "cannot load a model from 'no-such-model-xyz'" in run_cli(
        capsys, "train", "--model", "no-such-model-xyz", "--task", "rte", "--output-dir", tmp_path / "r"
    )
    assert not (tmp_path / "r").exists()


def test_compare_runs_methods_side_by_side_on_an_instruction_task(capsys, tmp_path, tiny_chat_lm_dir):
    from helpers import GLUE, needs_glue

    if not GLUE.is_dir():
        pytest.skip(needs_glue.kwargs["reason"])
    out = tmp_path / "cmp"
    text = run(
        capsys,
        "compare",
        "--tasks",
        "rte",
        "--methods",
        "dynamic,peft-lora,peft-eva",
        "--seeds",
        0,
        "--model",
        tiny_chat_lm_dir,
        "--data-dir",
        GLUE,
        "--max-steps",
        2,
        "--batch-size",
        4,
        "--max-train-samples",
        8,
        "--max-eval-samples",
        8,
        "--max-length",
        256,
        "--rank",
        2,
        "--output-dir",
        out,
        "--no-progress",
    )
    assert "| dynamic |" in text and "| peft-lora |" in text and "rte (accuracy)" in text
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    # EVA starts from the inputs of the first batches: a decoder's instruction batches included
    assert {r["method"] for r in results} == {"dynamic", "peft-lora", "peft-eva"} and all(
        r["labels"] == ["yes", "no"] for r in results
    )
