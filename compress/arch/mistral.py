"""Mistral (7B, Nemo): Llama layout with sliding-window attention."""

from compress.arch.base import Adapter, register_adapter


@register_adapter
class MistralAdapter(Adapter):
    model_types = ("mistral",)
    bias_flags = {}
    transformers_module = "transformers.models.mistral.modeling_mistral"
    model_class = "MistralForCausalLM"
    config_class = "MistralConfig"
