"""Base adapter for decoder-only transformers with q/k/v/o attention and a gated MLP."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from compress.errors import UserError
from compress.model.offload import onloaded

_REGISTRY: dict[str, type["Adapter"]] = {}


def register_adapter(cls: type["Adapter"]) -> type["Adapter"]:
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def adapter_classes() -> list[type["Adapter"]]:
    """The registered adapter classes (one per architecture family)."""
    return list(dict.fromkeys(_REGISTRY.values()))


def base_model_type(config: dict) -> str | None:
    """The architecture of a config.json: a compress per-layer export names its source's in compress_base."""
    return (config.get("compress_base") or {}).get("model_type") or config.get("model_type")


def get_adapter(model: nn.Module, offload_store: Path | None = None) -> "Adapter":
    """The adapter of `model`'s architecture. `offload_store`: folder where its disk-offloaded layers
    go after being handled (see compress.model.offload), None when every layer stays in memory."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UserError(
            f"unsupported architecture '{model_type}': supported model types are "
            f"{', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type](model, offload_store)


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads


class Adapter:
    """Names and shapes of one architecture family. Subclasses set the attribute names."""

    model_types: tuple[str, ...] = ()
    is_moe = False  # mixture-of-experts MLPs (compress.arch.moe)
    width_key = "intermediate_size"  # config key of the MLP width
    # False where the stock class cannot hold fewer heads (structured methods then keep every
    # KV group; the MLPs carry the whole budget)
    attention_prunable = True
    layers_path = "model.layers"
    attention_name = "self_attn"
    q_name, k_name, v_name, o_name = "q_proj", "k_proj", "v_proj", "o_proj"
    mlp_name = "mlp"
    gate_name, up_name, down_name = "gate_proj", "up_proj", "down_proj"
    base_model_path = "model"
    # Config flags that give every attention / MLP linear a bias in the stock classes (a uniform
    # checkpoint whose output projections gained a bias can keep the stock config only through them).
    bias_flags: dict[str, str] = {"attention": "attention_bias", "mlp": "mlp_bias"}
    # Transformers module holding the stock classes, for the exported modelling file.
    transformers_module = ""
    model_class = ""
    config_class = ""

    def __init__(self, model: nn.Module, offload_store: Path | None = None):
        self.model = model
        self.config = model.config
        self.offload_store = offload_store  # where disk-offloaded layers go after being handled, or None

    @classmethod
    def linear_names(cls) -> tuple[str, ...]:
        """Leaf names of the seven decoder linears (q, k, v, o, gate, up, down) in this family."""
        return (cls.q_name, cls.k_name, cls.v_name, cls.o_name, cls.gate_name, cls.up_name, cls.down_name)

    def onloaded(self, index: int, write_back: bool = True):
        """Context: decoder layer `index` in memory while inside (a disk-offloaded layer is read in, and
        written back to the offload store at the end unless `write_back=False`)."""
        return onloaded(self.layers()[index], self.offload_store, f"layer-{index:04d}", write_back=write_back)

    # ---- structure -------------------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.layers_path)

    def base_model(self) -> nn.Module:
        return self.model.get_submodule(self.base_model_path)

    def num_layers(self) -> int:
        return len(self.layers())

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def experts(self, layer: nn.Module) -> nn.Module | None:
        """The fused experts module of a mixture-of-experts layer; None for a dense MLP."""
        return None

    def qkv(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        attn = self.attention(layer)
        return getattr(attn, self.q_name), getattr(attn, self.k_name), getattr(attn, self.v_name)

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attention(layer), self.o_name)

    def gate_up(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        mlp = self.mlp(layer)
        return getattr(mlp, self.gate_name), getattr(mlp, self.up_name)

    def down_proj(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp(layer), self.down_name)

    def decoder_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Every prunable linear of a layer, keyed by its path inside the layer."""
        a, m = self.attention_name, self.mlp_name
        return {
            f"{a}.{self.q_name}": self.qkv(layer)[0],
            f"{a}.{self.k_name}": self.qkv(layer)[1],
            f"{a}.{self.v_name}": self.qkv(layer)[2],
            f"{a}.{self.o_name}": self.o_proj(layer),
            f"{m}.{self.gate_name}": self.gate_up(layer)[0],
            f"{m}.{self.up_name}": self.gate_up(layer)[1],
            f"{m}.{self.down_name}": self.down_proj(layer),
        }

    def input_groups(self, layer: nn.Module | None = None) -> list[list[str]]:
        """Names of `decoder_linears` that read the same input, groups in execution order (one statistic per group)."""
        a, m = self.attention_name, self.mlp_name
        return [[f"{a}.{self.q_name}", f"{a}.{self.k_name}", f"{a}.{self.v_name}"], [f"{a}.{self.o_name}"],
                [f"{m}.{self.gate_name}", f"{m}.{self.up_name}"], [f"{m}.{self.down_name}"]]

    def output_projection_paths(self) -> tuple[str, str]:
        return f"{self.attention_name}.{self.o_name}", f"{self.mlp_name}.{self.down_name}"

    # ---- shapes ----------------------------------------------------------------------------
    def head_dim(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return head_dim or self.config.hidden_size // self.config.num_attention_heads

    def attention_shape(self, layer: nn.Module) -> AttentionShape:
        """Current (possibly pruned) head counts of one layer, read off the weights."""
        head_dim = self.head_dim()
        q, k, _ = self.qkv(layer)
        return AttentionShape(q.out_features // head_dim, k.out_features // head_dim, head_dim)

    def intermediate_size(self, layer: nn.Module) -> int:
        return self.down_proj(layer).in_features

    def layer_width_key(self, layer: nn.Module) -> str:
        """Config key of this layer's MLP width (MoE models name the experts' width differently)."""
        return self.width_key

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        shape = self.attention_shape(layer)
        return {
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "intermediate_size": self.intermediate_size(layer),
        }

    def check_supported(self) -> None:
        """Raise UserError if this model instance cannot be handled (e.g. MoE layers here)."""
        for index, layer in enumerate(self.layers()):
            for name in (self.attention_name, self.mlp_name):
                if not hasattr(layer, name):
                    raise UserError(f"layer {index} has no '{name}' module: this model is not a supported "
                                    f"{'/'.join(self.model_types)} layout")
            if not isinstance(self.down_proj(layer), nn.Linear):
                raise UserError(f"layer {index}: the MLP is not a dense gated MLP (mixture of experts is not "
                                f"supported yet)")


def known_linear_names() -> tuple[str, ...]:
    """Decoder-linear leaf names of every supported family, in the first family's order."""
    names: list[str] = []
    for adapter in [Adapter, *_REGISTRY.values()]:
        names += [name for name in adapter.linear_names() if name not in names]
    return tuple(names)
