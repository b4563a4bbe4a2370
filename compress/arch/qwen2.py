"""Qwen2 / Qwen2.5: Llama layout with biases on q/k/v (sliced with their rows)."""

from compress.arch.base import Adapter, register_adapter


@register_adapter
class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
    bias_flags = {}  # q/k/v always have biases, o_proj never
    transformers_module = "transformers.models.qwen2.modeling_qwen2"
    model_class = "Qwen2ForCausalLM"
    config_class = "Qwen2Config"
