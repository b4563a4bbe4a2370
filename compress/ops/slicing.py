"""Physical removal of attention units and MLP channels, shared by every structured method.

An attention unit is one key/value group: its key and value head, the query heads that read
from it, and the matching input columns of the output projection. Removing whole groups keeps
`num_attention_heads // num_key_value_heads` constant, which is what the stock attention code
assumes. An MLP unit is one intermediate channel: a row of gate and up, a column of down.

Compensation of the output projections (o_proj, down_proj), whose input columns are removed:
* `MeanCompensation` (FLAP's bias compensation): the removed inputs are replaced by their
  calibration mean, `bias += W[:, P] @ mean[P]`.
* `LeastSquaresCompensation`: the removed inputs are replaced by their best linear prediction from
  the kept ones, x_P ~ A x_K + c with A = Cov[P,K] Cov[K,K]^-1 (ridge-damped) and
  c = mean[P] - A mean[K]; so `W_K += W_P A` and `bias += W_P c`. It contains the mean
  compensation (A = 0) and minimises the output error over the calibration tokens; the solve is
  the OBS engine's `compress.ops.obs.remove_inputs`.
Both are computed in float64 before slicing.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.arch.base import Adapter, AttentionShape
from compress.arch.moe import expert_linears, set_expert_weights, set_experts
from compress.model.memory import release_file_pages
from compress.ops.obs import remove_inputs


class MeanCompensation:
    def __init__(self, mean: torch.Tensor):
        self.mean = mean

    def columns(self, linear: nn.Linear, kept: torch.Tensor) -> nn.Linear:
        return keep_columns(linear, kept, compensation_bias(linear, self.mean, kept))


class LeastSquaresCompensation:
    """`intercept=False` fits x_P ~ A x_K through the origin (on the second moment instead of the
    covariance): for projections that cannot carry a bias, such as fused MoE experts."""

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor, damping: float = 0.01, intercept: bool = True):
        self.covariance = covariance.double()
        self.mean = mean.double().to(self.covariance.device)
        self.damping = damping
        self.intercept = intercept

    def columns(self, linear: nn.Linear, kept: torch.Tensor) -> nn.Linear:
        moment = self.covariance if self.intercept else self.covariance + torch.outer(self.mean, self.mean)
        new_weight, shift = remove_inputs(linear.weight, moment, kept, self.damping,
                                          mean=self.mean if self.intercept else None)
        device, dtype = linear.weight.device, linear.weight.dtype
        bias = linear.bias.detach().double().to(moment.device) if linear.bias is not None else None
        if shift is not None:
            bias = bias + shift if bias is not None else shift
        return _new_linear(new_weight.to(device=device, dtype=dtype),
                           bias.to(device=device, dtype=dtype) if bias is not None else None)


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


def _output_columns(linear: nn.Linear, kept: torch.Tensor, compensation) -> nn.Linear:
    if compensation is None:
        return keep_columns(linear, kept)
    if isinstance(compensation, torch.Tensor):
        compensation = MeanCompensation(compensation)
    return compensation.columns(linear, kept)


def slice_attention(adapter: Adapter, layer: nn.Module, kept_groups, compensation=None) -> None:
    """Keep only `kept_groups` (KV-group indices) of a layer's attention, in place.

    `compensation`: None, a mean vector (bias compensation) or a *Compensation object for o_proj.
    """
    shape = adapter.attention_shape(layer)
    q_index, kv_index = group_channels(shape, kept_groups)
    attn = adapter.attention(layer)
    q, k, v = adapter.qkv(layer)
    o = adapter.o_proj(layer)
    setattr(attn, adapter.o_name, _output_columns(o, q_index, compensation))
    setattr(attn, adapter.q_name, keep_rows(q, q_index))
    setattr(attn, adapter.k_name, keep_rows(k, kv_index))
    setattr(attn, adapter.v_name, keep_rows(v, kv_index))
    for old in (q, k, v, o):
        release_file_pages(old.weight)
    # Some attention classes cache head counts as attributes; keep them truthful.
    kept = len(kv_index) // shape.head_dim
    for name, value in (("num_heads", kept * shape.group_size), ("num_key_value_heads", kept)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def slice_mlp(adapter: Adapter, layer: nn.Module, kept_channels, compensation=None) -> None:
    """Keep only `kept_channels` of a layer's MLP intermediate width, in place (compensation as above)."""
    index = torch.as_tensor(kept_channels, dtype=torch.long).sort().values
    mlp = adapter.mlp(layer)
    gate, up = adapter.gate_up(layer)
    down = adapter.down_proj(layer)
    setattr(mlp, adapter.down_name, _output_columns(down, index, compensation))
    setattr(mlp, adapter.gate_name, keep_rows(gate, index))
    setattr(mlp, adapter.up_name, keep_rows(up, index))
    for old in (gate, up, down):
        release_file_pages(old.weight)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(index)


def slice_experts(adapter: Adapter, layer: nn.Module, kept: torch.Tensor, compensations: list | None = None) -> None:
    """Keep `kept[e]` (w channel indices) of every expert of a mixture-of-experts layer, in place.

    The fused layout needs one width per layer, so every expert keeps the same number of channels,
    each its own. `compensations[e]` (or None) rebuilds expert e's down projection: experts carry
    no bias, so only through-the-origin least squares applies (`LeastSquaresCompensation(intercept=False)`).
    """

    experts = adapter.experts(layer)
    gates, ups, downs = [], [], []
    for e, (gate, up, down) in enumerate(expert_linears(experts)):
        index = torch.as_tensor(kept[e], dtype=torch.long).sort().values
        compensation = compensations[e] if compensations is not None else None
        gates.append(gate.weight.detach()[index])
        ups.append(up.weight.detach()[index])
        downs.append(_output_columns(down, index, compensation).weight.detach())
    set_expert_weights(experts, gates, ups, downs)


def attention_unit_params(adapter: Adapter, layer: nn.Module) -> int:
    """Weight parameters removed with one KV group of this layer (q, k, v rows and o columns)."""
    shape = adapter.attention_shape(layer)
    q, _, _ = adapter.qkv(layer)
    o = adapter.o_proj(layer)
    per_group_rows = (shape.group_size + 2) * shape.head_dim
    return per_group_rows * q.in_features + shape.group_size * shape.head_dim * o.out_features


def mlp_unit_params(adapter: Adapter, layer: nn.Module) -> int:
    """Weights removed with one MLP channel (with one channel of every expert in an MoE layer)."""
    gate, up = adapter.gate_up(layer)
    experts = adapter.experts(layer)
    count = experts.down_proj.shape[0] if experts is not None else 1
    return count * (gate.in_features + up.in_features + adapter.down_proj(layer).out_features)


def decoder_linear_params(adapter: Adapter) -> int:
    """Weights of the attention and MLP linears of all decoder layers (the base of 'sparsity')."""
    return sum(
        linear.weight.numel() for layer in adapter.layers() for linear in adapter.decoder_linears(layer).values()
    )


def layer_linear_tensors(adapter: Adapter, layer: nn.Module) -> dict[str, torch.Tensor]:
    """Weights and biases of a layer's decoder linears, keyed `name.weight` / `name.bias`."""
    tensors = {}
    if adapter.experts(layer) is not None:  # the router too: a stage may have removed experts
        tensors[f"{adapter.mlp_name}.{adapter.router_name}.weight"] = adapter.router(layer).weight.detach()
    for name, linear in adapter.decoder_linears(layer).items():
        tensors[f"{name}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach()
    return tensors


def set_layer_linears(adapter: Adapter, layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved decoder linears (any widths, from `layer_linear_tensors`) into `layer`, in place."""
    experts = adapter.experts(layer)
    if experts is not None:

        prefix = f"{adapter.mlp_name}.experts"
        count = sum(1 for key in tensors if key.startswith(f"{prefix}.") and key.endswith(".down_proj.weight"))
        weights = ([tensors[f"{prefix}.{e}.{kind}.weight"] for e in range(count)]
                   for kind in ("gate_proj", "up_proj", "down_proj"))
        router = tensors.get(f"{adapter.mlp_name}.{adapter.router_name}.weight")
        if router is None:
            set_expert_weights(experts, *weights)
        else:
            set_experts(adapter, layer, *weights, router)
    for name, linear in adapter.decoder_linears(layer).items():
        if experts is not None and name.startswith(f"{adapter.mlp_name}.experts."):
            continue
        weight = tensors[f"{name}.weight"].to(linear.weight.device, linear.weight.dtype)
        bias = tensors.get(f"{name}.bias")
        if weight.shape == linear.weight.shape and (bias is None) == (linear.bias is None):
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            continue
        parent_name, _, attribute = name.rpartition(".")
        bias = bias.to(weight.device, weight.dtype) if bias is not None else None
        setattr(layer.get_submodule(parent_name), attribute, _new_linear(weight, bias))
        release_file_pages(linear.weight)
    shape = adapter.attention_shape(layer)
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    for name, value in (("num_heads", shape.num_heads), ("num_key_value_heads", shape.num_kv_heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = adapter.intermediate_size(layer)
