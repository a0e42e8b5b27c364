"""Base models and tokenizers as the ``dynlora`` command loads them, for training and for a saved adapter.

One loader for both, so what training sets up (a pad token for GPT-style tokenizers, the model's ``pad_token_id``)
is there too when ``dynlora eval/export/merge`` rebuild a model around a saved adapter.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..export import PEFT_CONFIG_NAME
from ..model import DynamicLoRAModel
from ..serialization import CONFIG_NAME, read_adapter_meta, saved_output_sizes
from ..shipped_models import DECODER_NAMES, HUB_IDS, resolve_model_path
from ..targets import HEAD_MODULE_NAMES


@dataclass
class BaseModel:
    """A base model (a sequence classifier or a causal LM), its tokenizer, and the names of the parameters its
    checkpoint did not provide."""

    model: nn.Module
    tokenizer: object
    fresh: set[str] = field(default_factory=set)


def quiet_transformers() -> None:
    """A task head is always new when fine-tuning: transformers' per-load report of it is noise here; so are
    bitsandbytes' notes, at import (peft imports it), that an optional CPU kernel is not in the local cache and
    that the hub was not asked about it (offline)."""
    import transformers

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def quantized_loading(bits: int | None, device: torch.device, compute_dtype: torch.dtype | None) -> dict[str, Any]:
    """from_pretrained's arguments for a bitsandbytes base (QLoRA): NF4 4-bit or 8-bit weights on ``device``; a
    classification head and a language model's output layer stay in full precision (one trains, both are what
    transformers leaves unquantised by default)."""
    if bits is None:
        return {}
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"--load-in-{bits}bit needs bitsandbytes: pip install 'dynlora[quantization]'")
    from transformers import BitsAndBytesConfig

    skip = [*HEAD_MODULE_NAMES, "lm_head"]
    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype or torch.float32,
            llm_int8_skip_modules=skip,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return {"quantization_config": config, "device_map": {"": device}}


def load_base(model: str | None, num_labels: int, regression: bool = False, **loading: Any) -> BaseModel:
    """The model (with a sequence-classification head of ``num_labels`` outputs) and tokenizer of ``model``: a
    local directory, a hub id, or None for the embedded MiniLM-L6."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # A checkpoint whose head has another number of labels (e.g. a classifier reused for STS-B) gets a new
        # head for this task, as fine-tuning needs anyway; the encoder weights still load.
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
            problem_type="regression" if regression else "single_label_classification",
            **loading,
        )
    except OSError as e:
        raise ValueError(f"cannot load a model from {model or path!r}: {str(e).splitlines()[0]}") from e
    _pad_as_eos(base, tokenizer)
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
    return BaseModel(base, tokenizer, set(info.get("missing_keys", ())) | mismatched)


def _pad_as_eos(model: nn.Module, tokenizer: Any) -> None:
    """GPT-style tokenizers have no pad token: pad with EOS, as is usual (batches carry an attention mask, and a
    language model's labels mask padding out)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(model: str | None, **loading: Any) -> BaseModel:
    """A causal language model and its tokenizer: a local directory, a hub id, or None for the shipped SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model or DECODER_NAMES[0])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = AutoModelForCausalLM.from_pretrained(path, **loading)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a causal language model from {model or path!r}: {str(e).splitlines()[0]}") from e
    _pad_as_eos(base, tokenizer)
    return BaseModel(base, tokenizer)


def is_causal_lm(class_name: str) -> bool:
    return class_name.endswith(("ForCausalLM", "LMHeadModel"))


def load_adapted(
    adapter: str,
    model: str | None = None,
    num_labels: int | None = None,
    device: torch.device | None = None,
    full_precision: bool = False,
) -> tuple[nn.Module, object]:
    """(model with the adapter, tokenizer) for a dynlora or PEFT adapter directory, on the base model it records
    (or ``model``), or for a whole model's directory (:func:`is_whole_model`) as it was saved; the head's size is
    read from the adapter unless ``num_labels`` is given. A dynlora adapter trained on a 4- or 8-bit base (QLoRA)
    gets that base again, on ``device``, unless ``full_precision`` (a merge or an export, which need the
    full-precision weights: :func:`adapter_base_bits` lets the caller say so)."""
    where = Path(adapter)
    if is_whole_model(where):
        if model is not None:
            print(f"note: {adapter} is a whole model, not an adapter: --model {model} is not used", file=sys.stderr)
        return _whole_model(where, num_labels)
    if (where / PEFT_CONFIG_NAME).is_file() and not (where / CONFIG_NAME).is_file():
        from peft import PeftModel

        peft_config = json.loads((where / PEFT_CONFIG_NAME).read_text())
        recorded = model or shipped_copy(peft_config.get("base_model_name_or_path"))
        if recorded != (model or peft_config.get("base_model_name_or_path")):
            print(
                f"{adapter} names {peft_config['base_model_name_or_path']} as its base: using the shipped {recorded} "
                "(pass --model to choose another)",
                file=sys.stderr,
            )
        heads = set(peft_config.get("modules_to_save") or ()) & set(HEAD_MODULE_NAMES)
        base = _recorded_base(
            where,
            None if model else recorded,
            lambda: load_base(recorded, num_labels or 2) if heads else load_causal_lm(recorded),
        )
        return PeftModel.from_pretrained(base.model, str(where)), base.tokenizer
    meta = read_adapter_meta(where)
    recorded = model or meta["base_model"].get("name_or_path")
    bits = None if full_precision else meta["base_model"].get("quantized_bits")
    loading = quantized_loading(bits, device or torch.device("cpu"), None)
    if is_causal_lm(meta["base_model"].get("class") or ""):
        base = _recorded_base(where, None if model else recorded, lambda: load_causal_lm(recorded, **loading))
    else:
        heads = saved_output_sizes(where)
        base = _recorded_base(
            where,
            None if model else recorded,
            lambda: load_base(recorded, num_labels or next(iter(heads.values()), 2), **loading),
        )
    return DynamicLoRAModel.from_pretrained(base.model, where), base.tokenizer


def is_whole_model(directory: str | Path) -> bool:
    """A saved whole model, not an adapter: a fully fine-tuned run's (``--method full``), or what ``dynlora merge``
    wrote (``config.json``, weights, tokenizer)."""
    where = Path(directory)
    adapters = (CONFIG_NAME, PEFT_CONFIG_NAME)
    return (where / "config.json").is_file() and not any((where / name).is_file() for name in adapters)


def _whole_model(where: Path, num_labels: int | None) -> tuple[nn.Module, object]:
    """A whole model's directory as it was saved: a causal LM, or a classifier whose head must fit ``num_labels``."""
    config = json.loads((where / "config.json").read_text())
    if is_causal_lm((config.get("architectures") or [""])[0]):
        base = load_causal_lm(str(where))
        return base.model, base.tokenizer
    saved = len(config.get("id2label") or {}) or 2
    if num_labels is not None and num_labels != saved:
        raise ValueError(
            f"{where} has a head of {saved} outputs and this task needs {num_labels}: evaluate it on the task (or a "
            "--dev-file of the labels) it was trained for"
        )
    base = load_base(str(where), saved, regression=config.get("problem_type") == "regression")
    return base.model, base.tokenizer


def base_class(model: nn.Module) -> str:
    """The transformers class under a loaded adapter (dynlora's or PEFT's), or a whole model's own."""
    if isinstance(model, DynamicLoRAModel):
        return type(model.model).__name__
    peft_base = getattr(model, "get_base_model", None)
    return type(peft_base() if peft_base else model).__name__


def _recorded_base(adapter: Path, recorded: str | None, load) -> BaseModel:
    """``load()``; when the base the adapter records cannot be loaded here, the error says what to pass instead
    (``recorded`` is None when the user chose the base: their error needs no hint)."""
    try:
        return load()
    except ValueError as e:
        if recorded is None:
            raise
        raise ValueError(
            f"{e}; {adapter} was trained on the base model {recorded!r}: pass --model with that model's directory or "
            "hub id"
        ) from e


def shipped_copy(name_or_path: str | None) -> str | None:
    """A PEFT adapter's base as dynlora loads it: the shipped copy of a model whose hub id it records (dynlora's
    exports of adapters trained on a shipped model name its original), else the recorded name."""
    shipped = {hub: name for name, hub in HUB_IDS.items()}
    return shipped.get(name_or_path, name_or_path)


def adapter_base_bits(adapter: str) -> int | None:
    """4 or 8 when a dynlora adapter was trained on a quantised base (QLoRA); None otherwise (PEFT adapters do not
    record it)."""
    where = Path(adapter)
    return read_adapter_meta(where)["base_model"].get("quantized_bits") if (where / CONFIG_NAME).is_file() else None


@torch.no_grad()
def center_regression_head(model: nn.Module, fresh: set[str], mean: float) -> bool:
    """Start a newly initialised one-output regression head at the training labels' mean (its bias), as one
    initialises a final layer to the scale of the data. ``fresh``: the parameter names the checkpoint did not
    provide (a head loaded with the model is left alone). False when there is nothing to set (Llama's ``score``
    has no bias).

    A fresh head predicts ~0 where STS-B's labels average 2.7: the first steps' large, uniform error then reaches
    the adapters as a push to move every prediction the same way, which can leave the model predicting the mean.
    """
    heads = [
        (name, m)
        for name, m in model.named_modules()
        if name.split(".")[0] in HEAD_MODULE_NAMES and isinstance(m, nn.Linear) and m.out_features == 1
    ]
    if not heads or heads[-1][1].bias is None or f"{heads[-1][0]}.bias" not in fresh:
        return False
    heads[-1][1].bias.fill_(mean)
    return True


def label_names(model: nn.Module, where: str) -> tuple[str, ...]:
    """The class names of a classifier's head, as training recorded them in the adapter (id order)."""
    config = model.config
    names = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        raise ValueError(
            f"{where} records no class names (a PEFT adapter, or one trained before dynlora 0.2), so the labels "
            "of a dev file cannot be matched to its outputs; evaluate on a GLUE --task instead"
        )
    return names
