"""Data for language models, as TRL names its formats: tokenised, with the loss on what the model should write.

- **prompt / completion** JSONL (``{"prompt": ..., "completion": ...}``): prompt tokens, then the completion's and an
  end-of-sequence token; only the completion (and its end) carries loss. A prompt too long for ``max_length`` is cut
  from its start; a completion that does not fit is an error.
- **chat** JSONL (``{"messages": [{"role": ..., "content": ...}, ...]}``, or ShareGPT's ``{"conversations":
  [{"from": "human" | "gpt" | "system", "value": ...}]}``): rendered with the model's chat template; only the
  assistant turns carry loss, and an assistant turn that does not fit in ``max_length`` is an error (as an
  over-long completion is): cut silently, it would teach the model to stop mid-answer without its end of turn.
  Their spans are found by rendering each conversation up to every assistant turn (the template's own text), so
  any template works without generation markers.
- **plain text** (``.txt``): tokenised whole and cut into ``max_length`` blocks, every token carrying loss.
- **documents** JSONL (``{"text": ...}``, TRL's language-modelling shape): each line a document, tokenised and cut
  into blocks on its own (no block spans two documents), every token carrying loss. Each block keeps its
  document's line number (``document``), so an evaluation can report a loss per document.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import DataError
from .custom import read_records
from .loader import IGNORE


def lm_format(path: str | os.PathLike, label_col: str = "label") -> str | None:
    """``completion``, ``chat``, ``text`` (.txt) or ``documents`` for a language-model file; None for a labelled
    classification file (a JSONL ``text`` with a ``label_col`` is one)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return "text"
    if path.suffix.lower() not in (".jsonl", ".json"):
        return None
    first = next(iter(read_records(path)), {})
    if "messages" in first or "conversations" in first:
        return "chat"
    if "prompt" in first and "completion" in first:
        return "completion"
    if "text" in first and label_col not in first:
        return "documents"
    return None


def lm_features(path: str | os.PathLike, tokenizer: Any, max_length: int) -> list[dict]:
    """Tokenised features (``input_ids``, ``attention_mask``, ``labels``) of a language-model file."""
    kind = lm_format(path)
    if kind == "text":
        return text_features(_text(Path(path)), tokenizer, max_length, str(path))
    records = read_records(Path(path))
    if not records:
        raise DataError(f"{path} has no examples")
    if kind == "chat":
        return [chat_features(messages_of(r), tokenizer, max_length, f"{path}: example {i}")
                for i, r in enumerate(records, start=1)]  # fmt: skip
    if kind == "completion":
        return [completion_features(r, tokenizer, max_length, f"{path}: example {i}")
                for i, r in enumerate(records, start=1)]  # fmt: skip
    if kind == "documents":
        blocks = []
        for i, record in enumerate(records):
            where = f"{path}: line {i + 1}"
            blocks += [{**block, "document": i} for block in document_features(record, tokenizer, max_length, where)]
        return blocks
    raise DataError(
        f"{path}: not a language-model file: each JSONL line needs 'prompt' and 'completion', 'messages', or 'text' "
        "(a .txt file is plain text)"
    )


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from None


def _feature(ids: list[int], labels: list[int]) -> dict:
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def completion_features(record: dict, tokenizer: Any, max_length: int, where: str) -> dict:
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError(f"{where}: 'prompt' and 'completion' must be text, and the completion not empty")
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(answer) >= max_length:
        raise DataError(
            f"{where}: the completion is {len(answer)} tokens, more than --max-length {max_length} leaves after "
            "one prompt token; raise --max-length or shorten it"
        )
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer) - max_length) :]  # keep the prompt's end
    return _feature(prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer)


ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def messages_of(record: dict) -> Any:
    """A chat record's turns: its ``messages``, or ShareGPT's ``conversations`` (``from``/``value``) as messages."""
    if "messages" in record:
        return record["messages"]
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t for t in turns):
        return turns
    return [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t.get("value")} for t in turns]


def check_messages(messages: Any, where: str, need_assistant: bool = True) -> None:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise DataError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} with text content")
    unknown = sorted({m["role"] for m in messages} - set(ROLES))
    if unknown:  # a misspelled assistant turn would silently carry no loss
        raise DataError(f"{where}: unknown role {unknown[0]!r}; a turn's role is one of {', '.join(ROLES)}")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn; every conversation needs one")


def render_chat(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the model's chat template writes it, and the character spans of the assistant turns."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError("the model's chat template does not render a conversation as the sum of its turns")
        spans.append((len(before), len(through)))
    return text, spans


def chat_features(messages: Any, tokenizer: Any, max_length: int, where: str) -> dict:
    check_messages(messages, where)
    text, spans = render_chat(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"][:max_length], encoded["offset_mapping"][:max_length]
    labels = [
        t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, offsets, strict=True)
    ]
    if all(label == IGNORE for label in labels):
        raise DataError(f"{where}: the first assistant turn starts after --max-length {max_length} tokens")
    kept = offsets[-1][1]  # characters of the rendered conversation that fit
    cut = len(encoded["input_ids"]) > max_length
    if cut and any(len(text[:end].rstrip()) > kept for _, end in spans):
        raise DataError(
            f"{where}: an assistant turn (with its end of turn) does not fit in --max-length {max_length} tokens "
            f"({len(encoded['input_ids'])} in all); raise --max-length, or shorten or split the conversation"
        )
    return _feature(ids, labels)


def text_features(text: str, tokenizer: Any, max_length: int, where: str) -> list[dict]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(ids) < 2:
        raise DataError(f"{where} has no text")
    blocks = [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    if len(blocks) > 1 and len(blocks[-1]) < 2:
        blocks.pop()  # a one-token block predicts nothing
    return [_feature(block, list(block)) for block in blocks]


def document_features(record: dict, tokenizer: Any, max_length: int, where: str) -> list[dict]:
    text = record.get("text")
    if not isinstance(text, str):
        raise DataError(f"{where}: 'text' must be text")
    return text_features(text, tokenizer, max_length, where)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
