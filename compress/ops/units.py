"""Kinds of allocation units: what one unit of a structured decision removes.

A kind is stored and reported as its string, so work folders and reports keep their format:

- `attention`: one KV group (its query heads, k/v head and o_proj columns);
- `mlp`: one MLP channel (gate/up rows and the down_proj column);
- `mlp.<e>`: the channels of expert e of a mixture-of-experts layer (statistics of its down_proj
  input; the layer keeps one width, each expert its own channels);
- `expert`: one whole expert (cost = the expert's parameters), for methods that remove experts.
"""

from __future__ import annotations

import torch

from compress.ops.slicing import group_channels

ATTENTION = "attention"
MLP = "mlp"
EXPERT = "expert"
KINDS = (ATTENTION, MLP, EXPERT)


def expert_channels(expert: int) -> str:
    """The kind of expert `expert`'s channels: 'mlp.<e>'."""
    return f"{MLP}.{expert}"


def expert_of(kind: str) -> int | None:
    """Expert index of an 'mlp.<e>' kind, None for any other kind."""
    prefix = f"{MLP}."
    return int(kind[len(prefix):]) if kind.startswith(prefix) else None


def is_expert_kind(kind: str) -> bool:
    """'mlp.<e>' kinds belong to one expert's down projection (which cannot carry a bias)."""
    return expert_of(kind) is not None


class UnitMasks:
    """Keep-masks of every layer's KV groups and MLP channels, applied to the outputs of q/k/v and
    gate/up by forward hooks (so a removed head emits zeros and a removed channel carries nothing)."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.kept: dict[tuple[int, str], torch.Tensor] = {}
        for index, layer in enumerate(adapter.layers()):
            self.kept[(index, "attention")] = torch.ones(adapter.attention_shape(layer).num_kv_heads, dtype=torch.bool)
            self.kept[(index, "mlp")] = torch.ones(adapter.intermediate_size(layer), dtype=torch.bool)
        self.factors: dict[tuple[int, str], torch.Tensor] = {}
        self.handles = []

    def install(self) -> None:
        adapter = self.adapter
        for index, layer in enumerate(adapter.layers()):
            q, k, v = adapter.qkv(layer)
            gate, up = adapter.gate_up(layer)
            for module, key in ((q, "q"), (k, "kv"), (v, "kv"), (gate, "mlp"), (up, "mlp")):
                self.handles.append(module.register_forward_hook(self._hook((index, key))))

    def _hook(self, key):
        def apply(_module, _args, output):
            factor = self.factors.get(key)
            return output if factor is None else output * factor.to(output.dtype)
        return apply

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def set(self, keep: dict[tuple[int, str], torch.Tensor]) -> None:
        """Masks from kept unit indices per (layer, kind)."""
        adapter = self.adapter
        for index, layer in enumerate(adapter.layers()):
            device = adapter.qkv(layer)[0].weight.device
            shape = adapter.attention_shape(layer)
            groups = keep[(index, "attention")]
            self.kept[(index, "attention")] = torch.zeros(shape.num_kv_heads, dtype=torch.bool)
            self.kept[(index, "attention")][groups] = True
            q_index, kv_index = group_channels(shape, groups)
            q_factor = torch.zeros(shape.num_heads * shape.head_dim, device=device)
            q_factor[q_index.to(device)] = 1.0
            kv_factor = torch.zeros(shape.num_kv_heads * shape.head_dim, device=device)
            kv_factor[kv_index.to(device)] = 1.0
            channels = torch.zeros(adapter.intermediate_size(layer), dtype=torch.bool)
            channels[keep[(index, "mlp")]] = True
            self.kept[(index, "mlp")] = channels
            self.factors[(index, "q")], self.factors[(index, "kv")] = q_factor, kv_factor
            self.factors[(index, "mlp")] = channels.to(device=device, dtype=torch.float32)

    def keep_indices(self) -> dict[tuple[int, str], torch.Tensor]:
        return {key: mask.nonzero().flatten() for key, mask in self.kept.items()}
