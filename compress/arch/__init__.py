"""Architecture adapters: the one place that knows where layers, projections and heads sit.

Methods and shared mechanisms never spell `model.model.layers[i].self_attn.q_proj`; they ask the
adapter. Adding an architecture means adding one adapter file and registering its `model_type`s.
"""

from compress.arch.base import Adapter, register_adapter, get_adapter, supported_model_types
from compress.arch import llama as _llama  # noqa: F401  (registers itself)

__all__ = ["Adapter", "register_adapter", "get_adapter", "supported_model_types"]
