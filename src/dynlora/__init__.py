"""dynlora: Dynamic LoRA fine-tuning for Hugging Face transformers.

The core (this package's top-level modules) wraps a model and runs the engine; ``dynlora.training`` is the
``dynlora`` command's training application, built on the core's public names.
"""

from typing import Any

from .allocator import RankAllocator, allocate
from .config import DynamicLoRAConfig, static_lora
from .engine import Engine
from .layer import DynamicLoRALinear
from .model import DynamicLoRAModel, get_dynlora_model
from .shipped_models import default_model_path, resolve_model_path

__all__ = [
    "DynamicLoRACallback",
    "DynamicLoRAConfig",
    "DynamicLoRALinear",
    "DynamicLoRAModel",
    "Engine",
    "RankAllocator",
    "allocate",
    "default_model_path",
    "get_dynlora_model",
    "resolve_model_path",
    "static_lora",
]
__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    # The callback imports transformers' Trainer stack: only when it is asked for.
    if name == "DynamicLoRACallback":
        from .callbacks import DynamicLoRACallback

        return DynamicLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
