"""Tiny randomly initialised Hugging Face models (one per architecture family) for fast, offline tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 97


def tiny_bert(num_labels: int = 2):
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2(head: str = "lm"):
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg) if head == "lm" else GPT2ForSequenceClassification(cfg)


# Llama and Qwen2 share their shape: grouped-query attention (2 KV heads for 4 query heads).
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(**DECODER))


def tiny_qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**DECODER))


def tiny_gemma():  # tied input/output embeddings, like GPT-2 and T5
    return GemmaForCausalLM(GemmaConfig(**DECODER, head_dim=8))


def tiny_t5():
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


# Decoders (and T5) as language models: the families of the decoder tests.
LM_BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma": tiny_gemma, "gpt2": tiny_gpt2, "t5": tiny_t5}

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "qwen2": tiny_qwen2}
# Default targets per family and how many layers they hit in a 2-layer model.
EXPECTED_TARGETS = {
    "bert": ("query", "value"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
}


def build(arch: str, seed: int = 0):
    """The same weights for the same (arch, seed): a fresh copy of a base model, as a user reloads it."""
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def randomize_adapters(model, seed: int = 1, scale: float = 0.3) -> None:
    """Give B non-zero values so the adapter changes the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * scale)


def batch(seed: int = 2, n: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT with MiniLM's real tokenizer, saved as a local model directory."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from dynlora import default_model_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tiny_llama(path, chat_template: str | None = CHATML, hidden: int = 32, tied: bool = False) -> str:
    """A tiny random Llama with MiniLM's real tokenizer (its [SEP] as end of sequence), as a local model directory;
    with ``chat_template``, the template of SmolLM2's kind; ``tied``: its output layer is its input embedding, as
    SmolLM2's is."""
    from transformers import AutoTokenizer

    from dynlora import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    tok.eos_token = "[SEP]"
    if chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = chat_template
    torch.manual_seed(0)
    sizes = {"hidden_size": hidden, "intermediate_size": 2 * hidden}
    cfg = LlamaConfig(
        **{**DECODER, **sizes, "vocab_size": len(tok), "max_position_embeddings": 256},
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.cls_token_id,
        tie_word_embeddings=tied,
    )
    cfg.pad_token_id = tok.pad_token_id
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat_lm_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"))


@pytest.fixture(scope="session")
def tmp_chat_tok(tiny_chat_lm_dir):
    """The tiny chat model's tokenizer (MiniLM's, with ChatML's special tokens and template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
