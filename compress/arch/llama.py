"""Llama family adapter (Llama 1/2/3, SmolLM, TinyLlama): q/k/v/o attention, SwiGLU MLP."""

from compress.arch.base import Adapter, register_adapter


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama",)
    transformers_module = "transformers.models.llama.modeling_llama"
    model_class = "LlamaForCausalLM"
    config_class = "LlamaConfig"
