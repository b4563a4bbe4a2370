"""Qwen3: Llama layout with per-head RMS norms on queries and keys (shared across heads, so removing
heads leaves them as they are)."""

from compress.arch.base import Adapter, register_adapter


@register_adapter
class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)
    bias_flags = {"attention": "attention_bias"}
    transformers_module = "transformers.models.qwen3.modeling_qwen3"
    model_class = "Qwen3ForCausalLM"
    config_class = "Qwen3Config"
