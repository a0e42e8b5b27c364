"""dynlora: Dynamic LoRA fine-tuning for Hugging Face transformers."""

from .allocator import RankAllocator, allocate
from .callbacks import DynamicLoRACallback
from .config import DynamicLoRAConfig
from .layer import DynamicLoRALinear
from .model import DynamicLoRAModel, get_dynlora_model
from .models import default_model_path, resolve_model_path

__all__ = [
    "DynamicLoRACallback",
    "DynamicLoRAConfig",
    "DynamicLoRALinear",
    "DynamicLoRAModel",
    "RankAllocator",
    "allocate",
    "default_model_path",
    "get_dynlora_model",
    "resolve_model_path",
]
__version__ = "0.1.0"
