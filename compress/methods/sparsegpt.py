"""SparseGPT: one-shot pruning with second-order weight updates (Frantar & Alistarh, ICML 2023, arXiv 2301.00774).

Per decoder linear, the input second moment H = E[x x^T] (the layer-wise Hessian up to a factor) comes
from the layer-by-layer capture, one H per distinct input (q/k/v share one, gate/up share one, each
expert its own, from the tokens routed to it), accumulated as shifted float64 moments. The weights
are then pruned column by column with the optimal-brain-surgeon update of the columns not yet
visited (`compress.ops.obs.prune_columns`): the mask of every `block_size` columns is chosen from
w^2 / [H^-1]_jj (unstructured: the lowest `sparsity` of the block, each linear on its own; N:M: the
M - N lowest of every M inputs of each row), lazily batched updates, `dampening` x mean(diag H) on
the diagonal. Linears that read one input are pruned as one stacked matrix (one Cholesky, one pass).

Layers are pruned in order, each calibrated on the already-pruned earlier layers (`inputs:
sequential`, the paper's choice) or on the dense model (`inputs: dense`, one pass per layer). Within
a layer (`within_layer: true`, the default) q/k/v are pruned first, then o_proj on the attention
of the pruned q/k/v, then gate/up, then down, each Hessian taken after the levels before it are
pruned (the order of GPTQ's `--true-sequential`); after the o level the attention is not run
again: its output is o_proj's, kept from o_proj's recorded inputs once o_proj is pruned. `owl:
true` gives each layer its own sparsity from Wanda-score outlier ratios (the OWL paper's choice for
SparseGPT too). `refit_iterations: K` (default 20) then re-fits every linear's kept weights to its
dense outputs with K conjugate-gradient steps, the mask fixed (`compress.ops.obs.refit_kept`): the
sweep's one pass leaves part of the least-squares optimum on the table, most of all under 2:4
(`refit_iterations: 0` is the paper's one sweep).

    - method: sparsegpt
      sparsity: 0.5
      pattern: unstructured      # or "2:4", "4:8" (sparsity must then be 1 - N/M)
      block_size: 128
      dampening: 0.01
      refit_iterations: 20       # 0: the paper's one sweep, no re-fit of the kept weights
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.methods.registry import register
from compress.methods.weight import WeightMethod
from compress.methods.weight_config import WeightStageConfig
from compress.ops.masks import parse_pattern
from compress.ops.obs import prune_columns, refit_kept


class SparseGptConfig(WeightStageConfig):
    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1, description="columns per block of the OBS sweep (lazy batch updates)")
    dampening: float = Field(0.01, gt=0.0, description="added to the Hessian's diagonal, x its mean")
    within_layer: bool = Field(
        True, description="prune q/k/v, o, the MLP inputs and down in turn, each Hessian measured on the layer "
                          "with the earlier ones already pruned (GPTQ's true-sequential order); false: one "
                          "Hessian pass per layer, all from the layer's dense weights")
    token_stride: int = Field(1, ge=1, description="accumulate the Hessian over every k-th calibration token "
                                                   "(1 = all; larger is faster, noisier)")
    refit_iterations: int = Field(
        20, ge=0, description="after the sweep, this many preconditioned conjugate-gradient steps re-fit each "
                              "linear's kept weights to its dense outputs, the mask fixed (0 = the paper's one "
                              "sweep; 20 gives 2:4 68.49 instead of 80.12 on SmolLM2-135M for 10% more time)")


@register
class SparseGpt(WeightMethod):
    name = "sparsegpt"
    Config = SparseGptConfig
    # set to a dict by a caller that wants every linear's Hessian (ARMOR): (layer, name) -> E[x x^T], float32 CPU
    hessians: dict | None = None

    def second_moment_stride(self) -> int | None:
        return self.config.token_stride

    def linear_scores(self, index, name, linear, stats):
        """Wanda's |W| x ||X||: only OWL's outlier ratios read it."""
        return linear.weight.detach().float().abs() * stats.l2_norm.to(linear.weight.device)[None, :]

    @torch.no_grad()
    def prune_layer(self, index, linears, groups, stats, sparsity):
        cfg = self.config
        nm = parse_pattern(cfg.pattern)
        for group in groups:
            members = [name for name in group if name in linears]
            if not members:
                continue
            weights = [linears[name].weight for name in members]
            shared = f" (+{len(members) - 1} sharing its input)" if len(members) > 1 else ""
            label = f"layers.{index}.{members[0]}{shared}"
            hessian = stats[members[0]].second_moment()
            if self.hessians is not None:
                kept = hessian.float().cpu()
                self.hessians.update({(index, name): kept for name in members})
            dense = torch.cat([w.detach() for w in weights])
            new, keep = prune_columns(dense, hessian, sparsity, nm, cfg.block_size, cfg.dampening,
                                      [w.shape[0] for w in weights], name=label)
            if cfg.refit_iterations:
                new, _errors = refit_kept(new, dense, hessian, keep, cfg.refit_iterations, cfg.dampening)
            for weight, part in zip(weights, new.split([w.shape[0] for w in weights])):
                weight.copy_(part.to(device=weight.device, dtype=weight.dtype))
