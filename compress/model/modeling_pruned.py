"""Modelling code for checkpoints whose decoder layers have different widths.

This file is copied next to every non-uniform checkpoint written by `compress` and referenced from
`config.json` through `auto_map`, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

rebuilds each decoder layer from `config.per_layer_config[i]` (`AutoModel` builds the decoder alone the
same way: what vLLM's Transformers backend asks for). `compress.load(folder)` uses the copy
inside the installed package instead, so no code is ever run from the checkpoint folder.

The stock architecture classes are reused: the model is built from the global (dense-width) config,
then every decoder layer is rebuilt from its own per-layer view. Per-layer attributes written by
`compress`: `intermediate_size`, `num_attention_heads`, `num_key_value_heads`. Bias flags for the
output projections (added by bias compensation) live in `compress_output_biases`. The saved
`model_type` is `compress_pruned_<base>`, so no stock class is ever built from this config by mistake.
Linears listed in `compress_factorized` (layer -> dotted path -> block size; ARMOR) are
`FactorizedLinear`: an N:M core between two block-diagonal matrices.

The three constants below are rewritten by the exporter for the source architecture.
"""

import importlib

import torch
from torch import nn

BASE_MODULE = "transformers.models.llama.modeling_llama"
BASE_MODEL_CLASS = "LlamaForCausalLM"
BASE_CONFIG_CLASS = "LlamaConfig"
# config.json names the model type "compress_pruned_<base>": the stock class of <base> cannot hold
# per-layer widths, so transformers must not pick it (the tokenizer, which builds the config too,
# then falls back to a plain config; the model needs the classes below, i.e. trust_remote_code).
PRUNED_PREFIX = "compress_pruned_"


def _relaxed_validate_architecture(self):
    # Per-layer head counts need not divide hidden_size when head_dim is explicit (the attention
    # projections are sized by heads * head_dim, not by hidden_size).
    if self.num_attention_heads % self.num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})"
        )


def attach_zero_bias(parent: nn.Module, name: str) -> None:
    """Give `parent.<name>` a zero bias if it has none (same outputs, stock module layout)."""
    old = getattr(parent, name)
    if old.bias is not None:
        return
    new = nn.Linear(old.in_features, old.out_features, bias=True, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
    setattr(parent, name, new)


class FactorizedLinear(nn.Module):
    """y = A'(core(B' x)) + bias: an N:M core between two block-diagonal factors (see module doc).

    `weight` is the core (zeros in place), `block_in` B' [in/b, b, b], `block_out` A' [out/b, b, b]."""

    def __init__(self, in_features: int, out_features: int, block: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        kwargs = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, **kwargs))
        self.block_in = nn.Parameter(torch.zeros(in_features // block, block, block, **kwargs))
        self.block_out = nn.Parameter(torch.zeros(out_features // block, block, block, **kwargs))
        self.bias = nn.Parameter(torch.zeros(out_features, **kwargs)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        shape = x.shape
        x = x.reshape(*shape[:-1], -1, b)
        x = torch.einsum("...nj,nij->...ni", x, self.block_in).reshape(shape)  # B' x
        x = nn.functional.linear(x, self.weight)
        x = x.reshape(*shape[:-1], -1, b)
        x = torch.einsum("...nj,nij->...ni", x, self.block_out).reshape(*shape[:-1], self.out_features)
        return x if self.bias is None else x + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def factorize(parent: nn.Module, name: str, block: int) -> None:
    """Replace `parent.<name>` (a linear) by an empty FactorizedLinear of its shape (weights loaded later)."""
    old = getattr(parent, name)
    setattr(parent, name, FactorizedLinear(old.in_features, old.out_features, block, bias=old.bias is not None,
                                           device=old.weight.device, dtype=old.weight.dtype))


def make_classes(base_module: str, base_model_class: str, base_config_class: str):
    """Return (config class, causal-LM class, decoder class) for per-layer-width checkpoints of one architecture."""
    module = importlib.import_module(base_module)
    config_module = importlib.import_module(base_module.replace(".modeling_", ".configuration_"))
    base_model = getattr(module, base_model_class)
    base_config = getattr(config_module, base_config_class)

    class PrunedConfig(base_config):
        @classmethod
        def get_config_dict(cls, *args, **kwargs):
            config_dict, kwargs = super().get_config_dict(*args, **kwargs)
            if str(config_dict.get("model_type", "")).startswith(PRUNED_PREFIX):
                config_dict = {**config_dict, "model_type": cls.model_type}  # the stock type, in memory
            return config_dict, kwargs

        def to_dict(self):
            output = super().to_dict()
            if output.get("per_layer_config"):
                output["model_type"] = PRUNED_PREFIX + self.model_type
            return output

        def validate_architecture(self):
            if getattr(self, "head_dim", None):
                _relaxed_validate_architecture(self)
            else:
                super().validate_architecture()

    def rebuild(model, config):
        """The stock classes read the (dense) global widths once; every layer is rebuilt here."""
        output_biases = getattr(config, "compress_output_biases", {}) or {}
        factorized = getattr(config, "compress_factorized", {}) or {}
        layers = model.layers
        for index in range(len(layers)):
            layer_config = config.per_layer_config[index]
            # Without this the per-layer view falls back to no attention implementation and
            # the causal mask is silently dropped.
            layer_config._attn_implementation = config._attn_implementation
            layer_config.allow_global_per_layer_attribute_access = False
            new_layer = type(layers[index])(layer_config, index)
            for dotted in output_biases.get(str(index), output_biases.get(index, [])):
                parent_path, _, leaf = dotted.rpartition(".")
                attach_zero_bias(new_layer.get_submodule(parent_path), leaf)
            for dotted, block in factorized.get(str(index), {}).items():
                parent_path, _, leaf = dotted.rpartition(".")
                factorize(new_layer.get_submodule(parent_path), leaf, block)
            layers[index] = new_layer

    def built_with_dense_widths(cls, self, config):
        from transformers.utils import logging

        had_access = config.allow_global_per_layer_attribute_access
        config.allow_global_per_layer_attribute_access = True
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            super(cls, self).__init__(config)
        finally:
            config.allow_global_per_layer_attribute_access = had_access
            logging.set_verbosity(verbosity)

    class PrunedForCausalLM(base_model):
        config_class = PrunedConfig

        def __init__(self, config):
            built_with_dense_widths(PrunedForCausalLM, self, config)
            rebuild(self.model, config)
            self.post_init()

    # The decoder alone (AutoModel: what vLLM's Transformers backend builds), e.g. LlamaModel
    decoder = next(getattr(module, name) for name in dir(module)
                   if name.endswith("Model") and not name.endswith("PreTrainedModel")
                   and getattr(getattr(module, name), "config_class", None) is base_config)

    class PrunedModel(decoder):
        config_class = PrunedConfig

        def __init__(self, config):
            built_with_dense_widths(PrunedModel, self, config)
            rebuild(self, config)
            self.post_init()

    PrunedModel.__name__ = "Pruned" + decoder.__name__
    PrunedConfig.__name__ = "Pruned" + base_config_class
    PrunedForCausalLM.__name__ = "Pruned" + base_model_class
    return PrunedConfig, PrunedForCausalLM, PrunedModel


PrunedConfig, PrunedForCausalLM, PrunedModel = make_classes(BASE_MODULE, BASE_MODEL_CLASS, BASE_CONFIG_CLASS)
