"""Wanda-sp: the structured Wanda baseline used in the FLAP paper.

Channel score of input channel j of `o_proj` / `down_proj`: mean over output rows i of
|W_ij| * ||x_j||_2 (the Wanda score averaged down a column). A KV group scores the sum of its
channels. Every layer loses the same share of its parameters (KV groups rounded, MLP channels
filling the rest of the layer's budget), and layers are pruned one after the other, each seeing
the already pruned layers' outputs. No bias compensation by default.

    - method: wanda_sp
      sparsity: 0.2
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.config import StructuredStageConfig
from compress.methods.registry import register
from compress.methods.structured import StructuredMethod
from compress.ops.allocation import uniform_allocation


class WandaSpConfig(StructuredStageConfig):
    method: Literal["wanda_sp"] = "wanda_sp"
    compensation: Literal["least_squares", "bias", "none"] = Field(
        "none", description="how o_proj/down_proj absorb the removed inputs (see compress.ops.slicing)")


def column_score(weight, channel_stats):
    """Mean over output rows of |W_ij| * ||x_j||_2, per input channel j."""
    return (weight.detach().float().cpu().abs() * channel_stats.l2_norm[None, :]).mean(0)


@register
class WandaSp(StructuredMethod):
    name = "wanda_sp"
    Config = WandaSpConfig
    sequential = True

    def attention_scores(self, adapter, layer, stats):
        channels = column_score(adapter.o_proj(layer).weight, stats)
        return channels.reshape(adapter.attention_shape(layer).num_kv_heads, -1).sum(1)

    def mlp_scores(self, gate, up, down, stats):
        return column_score(down.weight, stats)

    def allocate(self, scores):
        units = [u for layer_scores in scores.values() for u in layer_scores.units]
        return uniform_allocation(units, self.config.sparsity, self.config.min_units)
