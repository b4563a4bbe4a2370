"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE, OLMoE): attention as in Llama, and an MLP made of
a router (`mlp.gate`) and experts stored as fused 3-D tensors (transformers 5.x):
`mlp.experts.gate_up_proj` [experts, 2 x width, hidden] (gate rows first) and
`mlp.experts.down_proj` [experts, hidden, width].

To the shared code every expert looks like a dense gated MLP: `ExpertLinear` is one expert's
gate, up or down projection, a view into the fused tensor (so masks written through it land in
the checkpoint's own tensors). Inside `routed_experts(...)` (the run, from load to export, and each
layer the capture runs) the experts' forward is an equivalent routed loop that calls these views,
so the capture's statistic hooks see exactly the tokens the router sends to each expert (weighted
sums and routing unchanged); the stock forward is back afterwards. An expert that receives no calibration token
has no statistics: weight-level methods leave it as it is and report it. Only `keep_experts` /
`set_experts` change the router (its rows go with the experts they route to).

Weight-level methods (Wanda, magnitude, with OWL and N:M) mask experts' weights. Structured
methods (FLAP, Wanda-sp, CFSP) remove expert channels: the fused layout needs one width per
layer, so every expert of a layer keeps the same number of channels, each expert its own best
ones (see `compress.methods.base.StructuredMethod.expert_scores`). Whole experts are removed by
`keep_experts` (STUN, `compress.methods.stun`): the fused tensors and the router rows keep the chosen
experts, and the router's top-k never exceeds the experts left. GBLM's gradients are taken on the
fused tensors and cut back per expert (`calibration.gradients.trainable_targets`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from compress.arch.base import Adapter, register_adapter
from compress.errors import UserError


class ExpertLinear(nn.Module):
    """One expert's gate, up or down projection: a view into the fused expert tensor (no bias)."""

    bias = None

    def __init__(self, experts: nn.Module, parameter: str, expert: int, rows: slice | None = None):
        super().__init__()
        object.__setattr__(self, "_experts", experts)  # a reference, not a registered submodule
        self.parameter, self.expert, self.rows = parameter, expert, rows

    @property
    def weight(self) -> torch.Tensor:
        fused = getattr(self._experts, self.parameter)[self.expert]
        return fused if self.rows is None else fused[self.rows]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def expert_linears(experts: nn.Module) -> list[tuple[ExpertLinear, ExpertLinear, ExpertLinear]]:
    """(gate, up, down) views of every expert, created once per experts module."""
    cached = experts.__dict__.get("_compress_linears")
    if cached is None:
        width = experts.down_proj.shape[-1]
        cached = [(ExpertLinear(experts, "gate_up_proj", e, slice(0, width)),
                   ExpertLinear(experts, "gate_up_proj", e, slice(width, 2 * width)),
                   ExpertLinear(experts, "down_proj", e)) for e in range(experts.gate_up_proj.shape[0])]
        experts.__dict__["_compress_linears"] = cached
    return cached


@contextmanager
def routed_experts(modules):
    """While inside, each experts module of `modules` runs the routed loop over its per-expert views,
    so hooks on the views see exactly the tokens routed to each expert; the stock forward is back at
    the end. Nested uses share one patch (the outermost restores it)."""
    patched = []
    for experts in modules:
        if experts is None or "forward" in experts.__dict__:
            continue
        experts.forward = _routed_forward(experts, expert_linears(experts))
        patched.append(experts)
    try:
        yield
    finally:
        for experts in patched:
            experts.__dict__.pop("forward", None)


def model_experts(adapter) -> list[nn.Module]:
    """Every experts module of the model (none for a dense model)."""
    if not getattr(adapter, "is_moe", False):
        return []
    return [e for e in (adapter.experts(layer) for layer in adapter.layers()) if e is not None]


def set_expert_weights(experts: nn.Module, gates, ups, downs) -> None:
    """Replace the fused expert tensors by the stacked per-expert weights (any one width), in place;
    the views and the routed forward are rebuilt for the new width."""
    gate_up = torch.stack([torch.cat([gate, up], 0) for gate, up in zip(gates, ups)])
    down = torch.stack(list(downs))
    old = experts.gate_up_proj
    if gate_up.shape == old.shape and down.shape == experts.down_proj.shape:
        with torch.no_grad():
            old.copy_(gate_up.to(old.dtype))
            experts.down_proj.copy_(down.to(old.dtype))
        return
    device, dtype = old.device, old.dtype
    experts.gate_up_proj = nn.Parameter(gate_up.to(device, dtype).contiguous(), requires_grad=old.requires_grad)
    experts.down_proj = nn.Parameter(down.to(device, dtype).contiguous(), requires_grad=old.requires_grad)
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = down.shape[-1]
    experts.__dict__.pop("_compress_linears", None)
    if "forward" in experts.__dict__:  # inside routed_experts: route through the new views
        experts.forward = _routed_forward(experts, expert_linears(experts))


def keep_experts(adapter, layer: nn.Module, kept, gate_up: torch.Tensor | None = None,
                 down: torch.Tensor | None = None, router_rows: torch.Tensor | None = None) -> None:
    """Keep only the experts `kept` (indices, in order) of an MoE layer, in place.

    The fused tensors and the router rows are cut to those experts (or replaced by `gate_up` [E', 2w,
    hidden], `down` [E', hidden, w] and `router_rows` [E', hidden] when the caller merged experts).
    Routers that renormalise the top-k weights (Mixtral; Qwen3-MoE by default) only change which
    experts a token picks; without renormalisation (OLMoE) the softmax over fewer experts also gives
    the kept ones more weight, by 1 / (1 - the probability the removed ones had)."""
    experts, router = adapter.experts(layer), adapter.router(layer)
    kept = torch.as_tensor(kept, dtype=torch.long)
    with torch.no_grad():
        gate_up = experts.gate_up_proj[kept.to(experts.gate_up_proj.device)] if gate_up is None else gate_up
        down = experts.down_proj[kept.to(experts.down_proj.device)] if down is None else down
        rows = router.weight[kept.to(router.weight.device)] if router_rows is None else router_rows
    width = gate_up.shape[1] // 2
    set_experts(adapter, layer, list(gate_up[:, :width]), list(gate_up[:, width:]), list(down), rows)


def set_experts(adapter, layer: nn.Module, gates, ups, downs, router_rows: torch.Tensor) -> None:
    """Give an MoE layer these experts (any count, any one width) and router rows, in place: the routing
    softmax runs over the experts given, and top-k becomes min(top-k, experts)."""
    experts, router = adapter.experts(layer), adapter.router(layer)
    set_expert_weights(experts, gates, ups, downs)
    old = router.weight
    if router_rows.shape == old.shape:
        with torch.no_grad():
            old.copy_(router_rows.to(old.dtype))
    else:
        router.weight = nn.Parameter(router_rows.to(old.device, old.dtype).contiguous(),
                                     requires_grad=old.requires_grad)
    count = len(downs)
    for module in (experts, router):
        if hasattr(module, "num_experts"):
            module.num_experts = count
    top_k = min(router.top_k, count)
    for module in (router, adapter.mlp(layer)):
        if hasattr(module, "top_k"):
            module.top_k = top_k


def _routed_forward(experts: nn.Module, linears):
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for expert, (gate, up, down) in enumerate(linears):
            token_index, position = torch.where(top_k_index == expert)
            if token_index.numel() == 0:
                continue
            state = hidden_states[token_index]
            weights = top_k_weights[token_index, position, None]
            down.routing_weights = weights  # what hooks on the view may read: its tokens' routing weights
            output = down(experts.act_fn(gate(state)) * up(state)) * weights
            final.index_add_(0, token_index, output.to(final.dtype))
        return final
    return forward


class MoeAdapter(Adapter):
    """Attention like Llama; the MLP of a layer is its experts (dense layers, if any, stay dense)."""

    is_moe = True
    bias_flags: dict[str, str] = {}
    width_key = "intermediate_size"  # config key of one expert's width

    experts_key = "num_local_experts"  # config key of the number of experts per layer
    router_name = "gate"  # the router inside the MoE block

    def experts(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.mlp(layer), "experts", None)

    def router(self, layer: nn.Module) -> nn.Module:
        """The layer's router (`mlp.gate`: `weight` [experts, hidden], `top_k`)."""
        return getattr(self.mlp(layer), self.router_name)

    def layer_widths(self, layer: nn.Module) -> dict:
        widths = super().layer_widths(layer)
        experts = self.experts(layer)
        if experts is not None:  # the config keys of an MoE layer's expert count and top-k
            widths["experts"] = {self.experts_key: experts.gate_up_proj.shape[0],
                                 "num_experts_per_tok": self.router(layer).top_k}
        return widths

    def decoder_linears(self, layer: nn.Module) -> dict[str, nn.Module]:
        experts = self.experts(layer)
        if experts is None:
            return super().decoder_linears(layer)
        a = self.attention_name
        linears = {f"{a}.{self.q_name}": self.qkv(layer)[0], f"{a}.{self.k_name}": self.qkv(layer)[1],
                   f"{a}.{self.v_name}": self.qkv(layer)[2], f"{a}.{self.o_name}": self.o_proj(layer)}
        for e, (gate, up, down) in enumerate(expert_linears(experts)):
            linears.update({f"{self.mlp_name}.experts.{e}.gate_proj": gate, f"{self.mlp_name}.experts.{e}.up_proj": up,
                            f"{self.mlp_name}.experts.{e}.down_proj": down})
        return linears

    def input_groups(self, layer: nn.Module | None = None) -> list[list[str]]:
        if layer is None or self.experts(layer) is None:
            return super().input_groups()
        a, m = self.attention_name, self.mlp_name
        groups = [[f"{a}.{self.q_name}", f"{a}.{self.k_name}", f"{a}.{self.v_name}"], [f"{a}.{self.o_name}"]]
        for e in range(len(expert_linears(self.experts(layer)))):
            groups += [[f"{m}.experts.{e}.gate_proj", f"{m}.experts.{e}.up_proj"], [f"{m}.experts.{e}.down_proj"]]
        return groups

    def gate_up(self, layer: nn.Module):
        """The first expert's gate and up views (every expert has the same shapes, and no biases)."""
        experts = self.experts(layer)
        return expert_linears(experts)[0][:2] if experts is not None else super().gate_up(layer)

    def down_proj(self, layer: nn.Module):
        experts = self.experts(layer)
        return expert_linears(experts)[0][2] if experts is not None else super().down_proj(layer)

    def layer_width_key(self, layer: nn.Module) -> str:
        return self.width_key if self.experts(layer) is not None else "intermediate_size"

    def intermediate_size(self, layer: nn.Module) -> int:
        experts = self.experts(layer)
        return experts.down_proj.shape[-1] if experts is not None else super().intermediate_size(layer)

    def check_supported(self) -> None:
        for index, layer in enumerate(self.layers()):
            experts = self.experts(layer)
            if experts is None:
                continue
            fused = (getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None))
            if any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in fused):
                raise UserError(f"layer {index}: the experts are not stored as fused 3-D tensors "
                                f"(gate_up_proj / down_proj); this transformers version's layout is not supported")


@register_adapter
class MixtralAdapter(MoeAdapter):
    model_types = ("mixtral",)
    transformers_module = "transformers.models.mixtral.modeling_mixtral"
    model_class = "MixtralForCausalLM"
    config_class = "MixtralConfig"


@register_adapter
class Qwen3MoeAdapter(MoeAdapter):
    model_types = ("qwen3_moe",)
    bias_flags = {"attention": "attention_bias"}
    width_key = "moe_intermediate_size"
    transformers_module = "transformers.models.qwen3_moe.modeling_qwen3_moe"
    model_class = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"


@register_adapter
class OlmoeAdapter(MoeAdapter):
    model_types = ("olmoe",)
    # q_norm / k_norm normalise the whole query / key projection (sized from hidden_size), not
    # each head: fewer heads would change the surviving heads' outputs and cannot be configured
    attention_prunable = False
    experts_key = "num_experts"
    transformers_module = "transformers.models.olmoe.modeling_olmoe"
    model_class = "OlmoeForCausalLM"
    config_class = "OlmoeConfig"
