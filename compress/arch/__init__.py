"""Architecture adapters: the one place that knows where layers, projections and heads sit.

Methods and shared mechanisms never spell `model.model.layers[i].self_attn.q_proj`; they ask the
adapter. Adding an architecture means adding one adapter file and registering its `model_type`s.
"""

from compress.arch import gemma3 as _gemma3  # noqa: F401
from compress.arch import llama as _llama  # noqa: F401  (each module registers itself)
from compress.arch import mistral as _mistral  # noqa: F401
from compress.arch import moe as _moe  # noqa: F401
from compress.arch import qwen2 as _qwen2  # noqa: F401
from compress.arch import qwen3 as _qwen3  # noqa: F401
from compress.arch.base import (
    Adapter,
    adapter_classes,
    base_model_type,
    get_adapter,
    register_adapter,
    supported_model_types,
)

__all__ = ["Adapter", "adapter_classes", "base_model_type", "register_adapter", "get_adapter", "supported_model_types"]
