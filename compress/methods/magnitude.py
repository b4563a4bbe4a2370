"""Magnitude pruning: the baseline every weight-level method is compared with.

Score |W_ij|, no calibration data used. Unstructured masks compare all weights of a matrix
(`group: layer`, the classic form) or each output row (`group: row`); N:M keeps the largest N of
every M consecutive inputs.

    - method: magnitude
      sparsity: 0.5
      pattern: "2:4"
"""

from __future__ import annotations

from typing import Literal

from compress.methods.registry import register
from compress.methods.weight import WeightMethod
from compress.methods.weight_config import WeightStageConfig


class MagnitudeConfig(WeightStageConfig):
    method: Literal["magnitude"] = "magnitude"
    group: Literal["layer", "row"] = "layer"


@register
class Magnitude(WeightMethod):
    name = "magnitude"
    Config = MagnitudeConfig
    uses_activations = False

    def linear_scores(self, index, name, linear, stats):
        return linear.weight.detach().float().abs()
