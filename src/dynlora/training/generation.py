"""``dynlora generate``: what is fed to the model (a prompt to continue, or a conversation rendered with the chat
template) and how it decodes, checked before anything is loaded where possible."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .base_model import adapter_base_bits, base_class, is_causal_lm, load_adapted, load_causal_lm, quiet_transformers
from .data.lm import check_messages
from .devices import resolve_device
from .errors import DataError
from .run_facts import read_run_facts


@dataclass
class GenerateSettings:
    """What ``dynlora generate`` was asked (its flags' help says what each is)."""

    prompt: str | None = None
    messages: str | None = None
    system: str | None = None
    adapter: str | None = None
    model: str | None = None
    chat: bool | None = None  # None: a chat turn if the model has a template and the adapter was trained on chat
    max_new_tokens: int = 64
    temperature: float = 0.0
    device: str = "auto"


def generate(s: GenerateSettings) -> None:
    """Stream the model's continuation (or answer) to stdout."""
    from transformers import TextStreamer

    check_decoding(s.temperature, s.max_new_tokens)
    turns = conversation(s.prompt, s.messages, s.system)
    quiet_transformers()
    device = resolve_device(s.device)
    if s.adapter:
        model, tok = load_adapted(s.adapter, s.model, device=device)  # a QLoRA adapter on its 4-bit base
        if not is_causal_lm(base_class(model)):
            raise ValueError(f"{s.adapter} adapts a {base_class(model)}: generate needs a causal LM")
    else:
        base = load_causal_lm(s.model)
        model, tok = base.model, base.tokenizer
    if not adapter_base_bits(s.adapter or ""):  # a quantised base was loaded onto its device
        model.to(device)
    model.eval()
    trained_on = read_run_facts(s.adapter).get("prompt_format", "chat")  # how the adapter was trained to read
    chat = s.chat if s.chat is not None else bool(tok.chat_template) and trained_on == "chat"
    if chat and not tok.chat_template:
        raise ValueError("the model has no chat template: drop --chat to continue the prompt as plain text")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    inputs = {k: v.to(device) for k, v in model_inputs(tok, turns, chat, positions, s.max_new_tokens).items()}
    sampling = {"do_sample": True, "temperature": s.temperature} if s.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        model.generate(
            **inputs,
            max_new_tokens=s.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
            **sampling,
        )


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
