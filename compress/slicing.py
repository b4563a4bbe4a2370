"""Physical removal of attention units and MLP channels, shared by every structured method.

An attention unit is one key/value group: its key and value head, the query heads that read
from it, and the matching input columns of the output projection. Removing whole groups keeps
`num_attention_heads // num_key_value_heads` constant, which is what the stock attention code
assumes. An MLP unit is one intermediate channel: a row of gate and up, a column of down.

Bias compensation (FLAP): the removed inputs of an output projection are replaced by their
calibration mean, i.e. `bias += W[:, removed] @ mean[removed]`, computed in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.arch.base import Adapter, AttentionShape


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def keep_rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep the output features `index` of a linear."""
    bias = linear.bias[index] if linear.bias is not None else None
    return _new_linear(linear.weight[index], bias)


def keep_columns(linear: nn.Linear, index: torch.Tensor, bias_shift: torch.Tensor | None = None) -> nn.Linear:
    """Keep the input features `index`; add `bias_shift` to the bias (creating one if needed)."""
    bias = linear.bias
    if bias_shift is not None:
        base = bias.float() if bias is not None else torch.zeros(linear.out_features, device=bias_shift.device)
        bias = (base + bias_shift.float()).to(linear.weight.dtype)
    return _new_linear(linear.weight[:, index], bias)


def compensation_bias(linear: nn.Linear, input_mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed] in float32: the mean contribution of the removed inputs."""
    removed = torch.ones(linear.in_features, dtype=torch.bool, device=linear.weight.device)
    removed[kept] = False
    weight = linear.weight.detach().float()[:, removed]
    return weight @ input_mean.to(weight.device).float()[removed]


def group_channels(shape: AttentionShape, kept_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of (query/o_proj channels, key/value channels) belonging to the kept KV groups.

    Transformers lays query heads out so that head h reads key/value head h // group_size, so the
    query heads of group g are g*group_size ... (g+1)*group_size - 1.
    """
    kept_groups = torch.as_tensor(kept_groups, dtype=torch.long).sort().values
    d = shape.head_dim
    kv = (kept_groups[:, None] * d + torch.arange(d)).reshape(-1)
    heads = (kept_groups[:, None] * shape.group_size + torch.arange(shape.group_size)).reshape(-1)
    q = (heads[:, None] * d + torch.arange(d)).reshape(-1)
    return q, kv


def slice_attention(adapter: Adapter, layer: nn.Module, kept_groups, input_mean: torch.Tensor | None = None) -> None:
    """Keep only `kept_groups` (KV-group indices) of a layer's attention, in place."""
    shape = adapter.attention_shape(layer)
    q_index, kv_index = group_channels(shape, kept_groups)
    attn = adapter.attention(layer)
    q, k, v = adapter.qkv(layer)
    o = adapter.o_proj(layer)
    shift = compensation_bias(o, input_mean, q_index) if input_mean is not None else None
    setattr(attn, adapter.q_name, keep_rows(q, q_index))
    setattr(attn, adapter.k_name, keep_rows(k, kv_index))
    setattr(attn, adapter.v_name, keep_rows(v, kv_index))
    setattr(attn, adapter.o_name, keep_columns(o, q_index, shift))
    # Some attention classes cache head counts as attributes; keep them truthful.
    kept = len(kv_index) // shape.head_dim
    for name, value in (("num_heads", kept * shape.group_size), ("num_key_value_heads", kept)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def slice_mlp(adapter: Adapter, layer: nn.Module, kept_channels, input_mean: torch.Tensor | None = None) -> None:
    """Keep only `kept_channels` of a layer's MLP intermediate width, in place."""
    index = torch.as_tensor(kept_channels, dtype=torch.long).sort().values
    mlp = adapter.mlp(layer)
    gate, up = adapter.gate_up(layer)
    down = adapter.down_proj(layer)
    shift = compensation_bias(down, input_mean, index) if input_mean is not None else None
    setattr(mlp, adapter.gate_name, keep_rows(gate, index))
    setattr(mlp, adapter.up_name, keep_rows(up, index))
    setattr(mlp, adapter.down_name, keep_columns(down, index, shift))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(index)


def attention_unit_params(adapter: Adapter, layer: nn.Module) -> int:
    """Weight parameters removed with one KV group of this layer (q, k, v rows and o columns)."""
    shape = adapter.attention_shape(layer)
    q, _, _ = adapter.qkv(layer)
    o = adapter.o_proj(layer)
    per_group_rows = (shape.group_size + 2) * shape.head_dim
    return per_group_rows * q.in_features + shape.group_size * shape.head_dim * o.out_features


def mlp_unit_params(adapter: Adapter, layer: nn.Module) -> int:
    gate, up = adapter.gate_up(layer)
    return gate.in_features + up.in_features + adapter.down_proj(layer).out_features


def decoder_linear_params(adapter: Adapter, model: nn.Module | None = None) -> int:
    """Weights of the attention and MLP linears of all decoder layers (the base of 'sparsity')."""
    return sum(
        linear.weight.numel() for layer in adapter.layers() for linear in adapter.decoder_linears(layer).values()
    )
