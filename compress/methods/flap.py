"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024, arXiv 2312.11983).

Removes whole attention KV groups and MLP channels without retraining.

* Signal: how much each input channel of `o_proj` / `down_proj` fluctuates over the calibration
  tokens. A channel that barely moves around its mean can be replaced by that mean, which a bias
  absorbs (the paper's bias compensation, `compensation: bias`: `b += W[:, removed] @ mean[removed]`).
  Default `compensation: least_squares` goes one step further (our extension, not in the paper):
  the removed inputs are replaced by their best linear prediction from the kept inputs of the same
  projection, fitted on the calibration covariance; the bias term is its intercept. Same units
  removed, same cost in parameters, lower error (SmolLM2 FLAP 20%: 48.0 -> 41.5 quick ppl).
* Metrics (per input channel j of the output projection W):
  `IFV` = Var(x_j); `WIFV` (default) = Var(x_j) * ||W[:, j]||^2; `WIFN` = mean_i |W_ij| * ||x_j||_2.
  As in the reference code, the attention metric is squared (`square_attention_metric`).
* Structures: `AL-AM` (default) z-scores the channel metric per layer and module, scores a KV group
  by the mean z of its channels, and keeps units by one global ranking in which each unit weighs
  its real parameter count (a KV group = its query heads + its k/v head + its o_proj columns), so
  the achieved sparsity matches the target under GQA. `UL-UM` removes the same share from every
  layer. `uniform: true` then rounds the decision to one width per kind so the stock config holds.
* Statistics are taken on the dense model (layer outputs propagate unpruned, as the global
  ranking needs every layer's scores before any decision).

Example stage:

    - method: flap
      sparsity: 0.2
      metric: WIFV
      structure: AL-AM
      compensation: least_squares
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.config import StructuredStageConfig
from compress.methods.registry import register
from compress.methods.structured import StructuredMethod
from compress.ops.allocation import global_allocation, same_width_allocation, standardize, uniform_allocation


class FlapConfig(StructuredStageConfig):
    method: Literal["flap"] = "flap"
    metric: Literal["IFV", "WIFV", "WIFN"] = "WIFV"
    structure: Literal["AL-AM", "UL-UM"] = "AL-AM"
    compensation: Literal["least_squares", "bias", "none"] = Field(
        "least_squares", description="how o_proj/down_proj absorb the removed inputs (see compress.ops.slicing)")
    square_attention_metric: bool = Field(True, description="square the o_proj metric as the reference code does")
    uniform: bool = Field(False, description="one width per kind in every layer (stock config, no custom code)")


def channel_metric(metric: str, weight: torch.Tensor, stats) -> torch.Tensor:
    weight = weight.detach().float().cpu()
    if metric == "IFV":
        return stats.variance
    if metric == "WIFV":
        return stats.variance * weight.pow(2).sum(0)
    return weight.abs().mean(0) * stats.l2_norm  # WIFN


@register
class Flap(StructuredMethod):
    name = "flap"
    Config = FlapConfig

    def attention_scores(self, adapter, layer, stats):
        cfg = self.config
        attention = channel_metric(cfg.metric, adapter.o_proj(layer).weight, stats)
        if cfg.square_attention_metric:
            attention = attention.pow(2)
        groups = attention.reshape(adapter.attention_shape(layer).num_kv_heads, -1)
        return standardize(attention).reshape(groups.shape).mean(1) if cfg.structure == "AL-AM" else groups.sum(1)

    def mlp_scores(self, gate, up, down, stats):
        mlp = channel_metric(self.config.metric, down.weight, stats)
        return standardize(mlp) if self.config.structure == "AL-AM" else mlp

    def allocate(self, scores):
        units = [u for layer_scores in scores.values() for u in layer_scores.units]
        cfg = self.config
        if cfg.structure == "AL-AM":
            keep = global_allocation(units, cfg.sparsity, cfg.min_units)
        else:
            keep = uniform_allocation(units, cfg.sparsity, cfg.min_units)
        if cfg.uniform:
            keep = same_width_allocation(units, keep, cfg.sparsity, cfg.min_units)
        return keep
