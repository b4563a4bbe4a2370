"""GBLM-Pruner: gradient-based language-model pruner (Das et al., arXiv 2311.04902).

Wanda's score plus a first-order term from the dense model's language-modelling loss:

    score_ij = |W_ij| * a_j  +  alpha * |W_ij| * G_ij

* G_ij: norm across calibration samples of the per-sample gradient dL_n/dW_ij (`gradient_norm:
  l2`, default, or `l1`), computed once on the model entering the stage (gradient checkpointing,
  float32 accumulators, see `calibration.gradients`) and cached as safetensors, so a second run at
  another sparsity or pattern skips it.
* a_j: the activation norm of input j, from the layer-by-layer capture through the already
  pruned earlier layers (as in Wanda). `scaling: code` (default) uses the released code's
  a_j = ||X_j||_2 / sqrt(samples) (the running mean over sequences); `scaling: paper` uses the
  paper's a_j = ||X_j||_2. With alpha = 100 the gradient term weighs sqrt(samples) times more
  under `code` (on SmolLM2, 128 samples: 11.3x); the benchmark rows say which reproduces better.
* Masks as Wanda: per output row (unstructured) or N of every M inputs.

    - method: gblm
      sparsity: 0.5
      pattern: unstructured      # or "2:4"
      alpha: 100
      gradient_norm: l2
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from calibration.gradients import cached_gradient_norms, linear_key
from compress.errors import UserError
from compress.methods.registry import register
from compress.methods.weight import WeightMethod
from compress.methods.weight_config import WeightStageConfig


class GblmConfig(WeightStageConfig):
    method: Literal["gblm"] = "gblm"
    alpha: float = Field(100.0, ge=0.0, description="weight of the gradient term")
    gradient_norm: Literal["l2", "l1"] = Field("l2", description="norm of the per-sample gradients across samples")
    scaling: Literal["code", "paper"] = Field(
        "code", description="activation term ||X_j|| / sqrt(samples) (released code) or ||X_j|| (paper)")
    gradient_checkpointing: bool = Field(True, description="recompute layers in the backward: less memory, +1 forward")
    cache_gradients: bool = Field(True, description="reuse gradients from $COMPRESS_CACHE/gradients when possible")

    def check_model(self, view, number: int, recipe) -> None:
        """Gradients flow through the whole model at once: refuse device_map/max_memory placements."""
        super().check_model(view, number, recipe)
        if recipe.model.offloading:
            raise UserError(f"stage {number} (gblm) takes gradients through the whole model at once, so it needs "
                            f"every layer in memory: drop model.max_memory/model.device_map for this recipe, or use "
                            f"stages.{number}.method=wanda (layer by layer, works offloaded)")


@register
class Gblm(WeightMethod):
    name = "gblm"
    Config = GblmConfig

    def prepare(self, ctx):
        cfg = self.config
        if ctx.windows is None or len(ctx.windows) == 0:
            raise UserError("gblm needs calibration data for its gradients; "
                            "set calibration=FILE (or calibration=self)")
        bar = ctx.make_bar("gradients", len(ctx.windows), "seq") if ctx.make_bar else None
        self.gradients = cached_gradient_norms(ctx.adapter, ctx.windows, cfg.gradient_norm, cfg.gradient_checkpointing,
                                               cfg.cache_gradients, progress=bar.update if bar else None, log=ctx.log)
        self.activation_scale = 1.0 / math.sqrt(len(ctx.windows)) if cfg.scaling == "code" else 1.0

    def linear_scores(self, index, name, linear, stats):
        weight = linear.weight.detach().float().abs()
        gradient = self.gradients[linear_key(index, name)].to(weight.device)
        if gradient.shape != weight.shape:
            raise UserError(f"cached gradient of layers.{index}.{name} has shape {tuple(gradient.shape)}, the weight "
                            f"{tuple(weight.shape)}; set cache_gradients=false")
        activation = stats.l2_norm.to(weight.device)[None, :] * self.activation_scale
        return weight * (activation + self.config.alpha * gradient)
