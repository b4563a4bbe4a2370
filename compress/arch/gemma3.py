"""Gemma-3 text models: head_dim 256 (explicit, not hidden/heads), GeGLU MLP with the gate/up/down
names, sliding-window and global layers (each layer's mask and rotary table are recorded per layer
by the capture), q/k norms, pre/post norms around attention and MLP."""

from compress.arch.base import Adapter, register_adapter


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3_text",)
    bias_flags = {"attention": "attention_bias"}
    transformers_module = "transformers.models.gemma3.modeling_gemma3"
    model_class = "Gemma3ForCausalLM"
    config_class = "Gemma3TextConfig"
