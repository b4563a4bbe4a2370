"""Wanda: pruning by weights and activations (Sun et al., ICLR 2024, arXiv 2306.11695).

Score of weight W_ij of every decoder linear: |W_ij| * ||X_j||_2, with ||X_j|| the L2 norm of
input channel j over the calibration tokens. Within each output row the lowest-scored weights
are zeroed (`pattern: unstructured`), or the best N of every M consecutive inputs are kept
(`pattern: "2:4"`). No weight update. Layers are pruned in order, each calibrated on the
already-pruned previous layers.

    - method: wanda
      sparsity: 0.5
      pattern: unstructured      # or "2:4", "4:8" (sparsity must then be 1 - N/M)
"""

from __future__ import annotations

from typing import Literal

from compress.methods.registry import register
from compress.methods.weight import WeightMethod
from compress.methods.weight_config import WeightStageConfig


class WandaConfig(WeightStageConfig):
    method: Literal["wanda"] = "wanda"


@register
class Wanda(WeightMethod):
    name = "wanda"
    Config = WandaConfig

    def linear_scores(self, index, name, linear, stats):
        return linear.weight.detach().float().abs() * stats.l2_norm.to(linear.weight.device)[None, :]
