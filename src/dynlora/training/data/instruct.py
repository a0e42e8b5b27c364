"""GLUE tasks as instructions for a chat model: each example a user turn, its label a one-word answer.

Training puts the loss on the answer's tokens only (a chat with one assistant turn, lm.py). Evaluation scores each
allowed answer by its log-likelihood after the user turn and takes the likeliest, then applies the task's official
metric: the model is never asked to generate, so an answer it words differently cannot be misread.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .glue import Example, TaskSpec
from .lm import render_chat


@dataclass(frozen=True)
class Instruction:
    question: str  # what the user asks, before the example's text
    first: str  # how the example's text is introduced
    second: str | None  # and its second text, for pair tasks
    answers: tuple[str, ...]  # the answer word of each label id


INSTRUCTIONS: dict[str, Instruction] = {
    "sst2": Instruction(
        "Is the sentiment of this movie review positive or negative?", "Review", None, ("negative", "positive")
    ),
    "cola": Instruction(
        "Is this English sentence grammatically acceptable? Answer yes or no.", "Sentence", None, ("no", "yes")
    ),
    "mrpc": Instruction(
        "Do these two sentences mean the same thing? Answer yes or no.", "Sentence 1", "Sentence 2", ("no", "yes")
    ),
    "qqp": Instruction(
        "Do these two questions ask the same thing? Answer yes or no.", "Question 1", "Question 2", ("no", "yes")
    ),
    "rte": Instruction("Does the first text imply the second? Answer yes or no.", "Text", "Hypothesis", ("yes", "no")),
    "qnli": Instruction(
        "Does the sentence answer the question? Answer yes or no.", "Question", "Sentence", ("yes", "no")
    ),
    "mnli": Instruction(
        "Does the premise imply the hypothesis? Answer yes, maybe or no.",
        "Premise",
        "Hypothesis",
        ("yes", "maybe", "no"),
    ),
    "wnli": Instruction("Does the first text imply the second? Answer yes or no.", "Text", "Hypothesis", ("no", "yes")),
}


def instruction(spec: TaskSpec) -> Instruction:
    if spec.name not in INSTRUCTIONS:
        raise DataError(
            f"{spec.name} is a regression task: it has no answer words to pose it as an instruction; train it with "
            "a regression head (--objective classify)"
        )
    return INSTRUCTIONS[spec.name]


def user_turn(spec: TaskSpec, example: Example) -> list[dict]:
    how = instruction(spec)
    text = f"{how.question}\n{how.first}: {example.text}"
    if how.second is not None:
        text += f"\n{how.second}: {example.text_pair}"
    return [{"role": "user", "content": text}]


def conversation(spec: TaskSpec, example: Example) -> list[dict]:
    """The example as a chat: the question, then the label's answer word as the assistant's turn."""
    answer = instruction(spec).answers[int(example.label)]
    return user_turn(spec, example) + [{"role": "assistant", "content": answer}]


def fitted(spec: TaskSpec, example: Example, tokenizer, max_length: int) -> Example:
    """``example`` with its first text (the passage) cut from its end, by tokens, until the whole conversation
    (question, texts, answer) fits in ``max_length``: the question and the answer are never cut. Training and
    evaluation fit each example alike, so a model is scored on what it was trained to read."""
    text = example.text
    for _ in range(8):  # re-tokenising a cut text can shift a token or two: a few rounds settle it
        candidate = Example(text, example.text_pair, example.label)
        rendered, _ = render_chat(conversation(spec, candidate), tokenizer)
        excess = len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - max_length
        if excess <= 0:
            return candidate
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if excess >= len(ids):
            raise DataError(
                f"{spec.name}: the question and answer alone are more than --max-length {max_length} tokens; "
                "raise --max-length"
            )
        text = tokenizer.decode(ids[: len(ids) - excess])
    raise DataError(f"{spec.name}: an example could not be cut to --max-length {max_length}; raise --max-length")
