"""``dynlora generate``: what is fed to the model (a prompt to continue, or a conversation rendered with the chat
template) and how it decodes, checked before anything is loaded where possible."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .data.lm import check_messages
from .errors import DataError


def check_decoding(temperature: float, max_new_tokens: int) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")


def conversation(prompt: str | None, messages_file: str | None, system: str | None) -> list[dict]:
    """The turns to render: a ``--messages`` file (a JSON list of turns, or one JSON object per line; a trailing
    user turn is answered) or the ``--prompt`` as one user turn, after the ``--system`` message if any."""
    if (prompt is None) == (messages_file is None):
        raise ValueError("give --prompt (one user turn) or --messages FILE (a conversation), one of the two")
    if messages_file is None:
        turns = [{"role": "user", "content": prompt}]
    else:
        path = Path(messages_file)
        if not path.is_file():
            raise FileNotFoundError(f"--messages {messages_file}: no such file")
        text = path.read_text(encoding="utf-8").strip()
        try:
            turns = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines()]
        except json.JSONDecodeError as e:
            raise DataError(f"--messages {messages_file}: not JSON ({e.msg}, line {e.lineno})") from None
        if isinstance(turns, dict) and "messages" in turns:
            turns = turns["messages"]
        check_messages(turns, f"--messages {messages_file}", need_assistant=False)
        if not turns or turns[-1]["role"] != "user":
            raise DataError(f"--messages {messages_file}: the last turn must be the user's, the one to answer")
    return ([{"role": "system", "content": system}] if system else []) + turns


def model_inputs(tok: Any, turns: list[dict], chat: bool, positions: int | None, max_new_tokens: int) -> dict:
    """Token ids of the conversation (chat) or of the prompt's text (plain continuation), checked to leave room
    for ``max_new_tokens`` within the model's ``positions``."""
    if chat:
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        if len(turns) != 1:
            raise ValueError("a conversation (--messages, --system) needs --chat and a model with a chat template")
        inputs = tok(turns[0]["content"], return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    if positions and length + max_new_tokens > positions:
        raise ValueError(
            f"the prompt is {length} tokens and --max-new-tokens {max_new_tokens} more would pass the model's "
            f"{positions} positions; lower --max-new-tokens to at most {max(positions - length, 0)}"
        )
    return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}  # no type ids
