"""dynlora: Dynamic LoRA fine-tuning for Hugging Face transformers.

The core (this package's top-level modules) wraps a model and runs the engine; ``dynlora.training`` is the
``dynlora`` command's training application, built on the core's public names.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports each name on first use
    from .allocator import RankAllocator as RankAllocator
    from .allocator import allocate as allocate
    from .callbacks import DynamicLoRACallback as DynamicLoRACallback
    from .config import DynamicLoRAConfig as DynamicLoRAConfig
    from .config import static_lora as static_lora
    from .engine import Engine as Engine
    from .layer import DynamicLoRALinear as DynamicLoRALinear
    from .model import DynamicLoRAModel as DynamicLoRAModel
    from .model import get_dynlora_model as get_dynlora_model
    from .shipped_models import default_model_path as default_model_path
    from .shipped_models import resolve_model_path as resolve_model_path

__version__ = "0.2.0"


# Where each public name lives: imported when first asked for, so that the command line (and `dynlora --help`)
# starts without loading torch and transformers.
_HOMES = {
    "DynamicLoRACallback": "callbacks",
    "DynamicLoRAConfig": "config",
    "DynamicLoRALinear": "layer",
    "DynamicLoRAModel": "model",
    "Engine": "engine",
    "RankAllocator": "allocator",
    "allocate": "allocator",
    "default_model_path": "shipped_models",
    "get_dynlora_model": "model",
    "resolve_model_path": "shipped_models",
    "static_lora": "config",
}


__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
