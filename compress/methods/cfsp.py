"""CFSP: coarse-to-fine structured pruning (Wang et al., COLING 2025, arXiv 2409.13199).

* Coarse: each decoder layer's importance is how far it turns the residual stream, the mean
  angular distance d_l = arccos(cos(h_in, h_out)) / pi over the calibration tokens. Layers get a
  keep ratio r_l proportional to sigmoid(temperature * (d_l - mean d)), scaled so the kept
  parameters meet the global target, and shrunk about the mean when a layer would keep more than
  all of it or less than `min_keep` (the released code's guard, made two-sided).
* Fine, inside each layer (`score: paper`, default): every MLP channel j is scored by its relative
  importance in the three matrices it lives in,
      S_j = sum_i |Wd_ij| a_j / sum_k |Wd_ik| a_k  +  sum_i |Wu_ji| / sum_k |Wu_ki|  +  same for Wg,
  with a_j = ||X_j|| the norm of down_proj's input channel j: the share of every output row's
  activation-weighted mass that comes from channel j, plus channel j's share of every input's
  up/gate weight mass. The released code normalises each term along the axis it then averages
  over, so its score collapses to a_j alone (`score: released` reproduces that).
  Attention (with `targets: both`): the same shares on o_proj columns and q/k/v rows, per KV group.
* `targets: mlp` (default, as the paper and its code) removes MLP channels only: the global target
  is still a fraction of all decoder-linear parameters, so the MLP loses more than `sparsity`.
  `targets: both` also removes KV groups: inside each layer, channels and groups are ranked by
  their z-scored scores, each weighing its parameter count (FLAP's AL-AM, within one layer).
* Removed inputs are compensated like FLAP (`compensation: least_squares` default, our extension;
  `bias`; `none` as the paper).
* The coarse importance is reported (`block_importance`) and drives importance-guided LoRA
  recovery (`method: lora`, `rank_allocation: importance`, see compress.methods.lora).

    - method: cfsp
      sparsity: 0.2
      targets: mlp
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from calibration.stats import angular_distance
from compress.config import StructuredStageConfig
from compress.errors import UserError
from compress.methods.base import LayerScores
from compress.methods.registry import register
from compress.methods.structured import StructuredMethod
from compress.ops.allocation import _keep_top, block_keep_ratios, global_allocation, importance_weights, standardize


class CfspConfig(StructuredStageConfig):
    method: Literal["cfsp"] = "cfsp"
    targets: Literal["mlp", "both"] = Field("mlp", description="MLP channels only (the paper), or KV groups too")
    score: Literal["paper", "released"] = Field(
        "paper", description="fine score: relative importance (paper) or activation norm (released code)")
    temperature: float = Field(6.5, gt=0, description="sigmoid temperature of the layer importance: a fixed "
                                                      "hyper-parameter (6.5 matches the released code only at "
                                                      "128 x 512 calibration tokens)")
    min_keep: float = Field(0.05, gt=0, lt=1, description="no layer keeps less than this share of its prunable part")
    compensation: Literal["least_squares", "bias", "none"] = "least_squares"

    def check_model(self, view, number: int, recipe) -> None:
        """An MLP-only stage cannot remove more than the MLPs' share of the decoder linears."""
        share = view.mlp_share()
        if share is not None and self.targets == "mlp" and self.sparsity >= share:
            raise UserError(f"stage {number} ({self.method}) removes {self.sparsity:.0%} of the decoder linears from "
                            f"the MLPs alone, which hold {share:.0%}; use stages.{number}.targets=both or a lower "
                            f"sparsity")


def relative_share(weight: torch.Tensor, channel_dim: int, activation: torch.Tensor | None = None) -> torch.Tensor:
    """Per channel (along `channel_dim`), summed over the other axis: |W| (x activation) divided by
    the total over all channels of the same row/column."""
    magnitude = weight.detach().float().abs().cpu()
    if activation is not None:
        shape = [1, 1]
        shape[channel_dim] = -1
        magnitude = magnitude * activation.reshape(shape)
    share = magnitude / magnitude.sum(channel_dim, keepdim=True).clamp_min(1e-12)
    return share.sum(1 - channel_dim)


@register
class Cfsp(StructuredMethod):
    name = "cfsp"
    Config = CfspConfig

    def observe_layer(self, layer):
        return angular_distance(layer)

    def attention_scores(self, adapter, layer, stats):
        cfg = self.config
        if cfg.score == "released":
            channels = stats.l2_norm.clone()
        else:
            channels = self._attention_channel_scores(adapter, layer, stats.l2_norm)
        shape = adapter.attention_shape(layer)
        if cfg.targets == "both":  # z-scored so channels and groups compete on one scale (see module doc)
            return standardize(channels).reshape(shape.num_kv_heads, -1).mean(1)
        return channels.reshape(shape.num_kv_heads, -1).sum(1)

    def mlp_scores(self, gate, up, down, stats):
        activation = stats.l2_norm
        if self.config.score == "released":
            mlp = activation.clone()
        else:
            mlp = (relative_share(down.weight, 1, activation) + relative_share(up.weight, 0)
                   + relative_share(gate.weight, 0))
        return standardize(mlp) if self.config.targets == "both" else mlp

    @staticmethod
    def _attention_channel_scores(adapter, layer, activation: torch.Tensor) -> torch.Tensor:
        """Score of every o_proj input channel (= q output channel): o/q shares plus its group's k/v share."""
        shape = adapter.attention_shape(layer)
        q, k, v = adapter.qkv(layer)
        o = adapter.o_proj(layer)
        channels = relative_share(o.weight, 1, activation) + relative_share(q.weight, 0)
        kv = (relative_share(k.weight, 0) + relative_share(v.weight, 0)).reshape(shape.num_kv_heads, 1, shape.head_dim)
        kv = kv.expand(shape.num_kv_heads, shape.group_size, shape.head_dim) / shape.group_size
        return channels + kv.reshape(-1)

    def keep_ratios(self, scores: dict[int, LayerScores]) -> tuple[list[int], torch.Tensor, float]:
        """(layers, keep ratio of each layer's prunable part, share of prunable parameters kept overall)."""
        cfg = self.config
        layers = sorted(scores)
        distance = torch.tensor([scores[i].block["angular_distance"] for i in layers], dtype=torch.float64)
        kinds = ("mlp",) if cfg.targets == "mlp" else ("attention", "mlp")
        sizes = torch.tensor([sum(len(u.scores) * u.unit_params for u in scores[i].units if u.kind in kinds)
                              for i in layers], dtype=torch.float64)
        total = sum(len(u.scores) * u.unit_params for i in layers for u in scores[i].units)
        removed = cfg.sparsity * total
        if removed >= float(sizes.sum()):
            raise UserError(f"cfsp: sparsity {cfg.sparsity} removes more than the MLPs hold "
                            f"({float(sizes.sum()) / total:.0%} of the decoder linears); use targets=both or a "
                            f"lower sparsity")
        keep = 1.0 - removed / float(sizes.sum())
        ratios = block_keep_ratios(importance_weights(distance, cfg.temperature), sizes, keep, cfg.min_keep)
        return layers, ratios, keep

    def allocate(self, scores):
        cfg = self.config
        layers, ratios, _ = self.keep_ratios(scores)
        keep = {}
        for index, ratio in zip(layers, ratios.tolist()):
            units = {u.kind: u for u in scores[index].units}
            if cfg.targets == "mlp":
                mlp = units["mlp"]
                keep[(index, "attention")] = torch.arange(len(units["attention"].scores))
                count = max(cfg.min_units, int(round(ratio * len(mlp.scores))))
                keep[(index, "mlp")] = _keep_top(mlp.scores, count)
            else:
                keep.update(global_allocation(list(units.values()), 1.0 - ratio, cfg.min_units))
        return keep

    def report_details(self, scores):
        layers, ratios, keep = self.keep_ratios(scores)
        return {"block_importance": [scores[i].block["angular_distance"] for i in layers],
                "block_keep_ratio": [round(float(r), 4) for r in ratios],
                "prunable_share_kept": keep}


