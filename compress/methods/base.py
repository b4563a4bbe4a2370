"""Shared machinery of pruning methods: the layer-by-layer loop, scoring hooks and slicing.

A structured method only says which inputs it observes, how it scores units from the observed
statistics, and how scores become keep-decisions. `StructuredMethod.run` does the rest:

    for each decoder layer (layer-by-layer capture):
        collect input statistics of the observed linears  (one forward of the layer)
        score the layer's units
        sequential methods: decide for this layer, slice it, recompute its outputs
    global methods: decide once for all layers, then slice every layer
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from compress.allocation import UnitScores
from compress.arch.base import Adapter
from compress.config_base import StageConfig
from compress.slicing import attention_unit_params, mlp_unit_params, slice_attention, slice_mlp
from compress.stats import ChannelStats, input_stats


@dataclass
class LayerScores:
    units: list[UnitScores]
    # Calibration mean of each output projection's input, for bias compensation.
    input_means: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StageContext:
    """What a stage gets from the pipeline: the model's adapter and a way to start a capture."""

    adapter: Adapter
    new_capture: callable  # (passes: int) -> LayerwiseCapture
    log: callable = print


class Method:
    """A pruning method: a validated config (`Config`) and a `run` that prunes the model in place."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]

    def __init__(self, config: StageConfig):
        self.config = config

    def run(self, ctx: StageContext) -> dict:
        raise NotImplementedError


class StructuredMethod(Method):
    """Removes KV groups and MLP channels; subclasses implement `score_layer` and `allocate`."""

    sequential: ClassVar[bool] = False

    def observed(self, adapter: Adapter, layer: nn.Module) -> dict[str, nn.Linear]:
        return {"attention": adapter.o_proj(layer), "mlp": adapter.down_proj(layer)}

    def score_layer(self, index: int, adapter: Adapter, layer: nn.Module, stats: dict[str, ChannelStats]) -> LayerScores:
        raise NotImplementedError

    def allocate(self, scores: dict[int, LayerScores]) -> dict[tuple[int, str], torch.Tensor]:
        raise NotImplementedError

    def bias_compensation(self) -> bool:
        return bool(getattr(self.config, "bias_compensation", False))

    @staticmethod
    def unit_scores(index: int, adapter: Adapter, layer: nn.Module, attention: torch.Tensor, mlp: torch.Tensor) -> list[UnitScores]:
        return [
            UnitScores(index, "attention", attention, attention_unit_params(adapter, layer)),
            UnitScores(index, "mlp", mlp, mlp_unit_params(adapter, layer)),
        ]

    def apply(self, adapter: Adapter, index: int, layer: nn.Module, keep: dict, scores: LayerScores) -> None:
        compensate = self.bias_compensation()
        groups = keep[(index, "attention")]
        if len(groups) < adapter.attention_shape(layer).num_kv_heads:
            slice_attention(adapter, layer, groups, scores.input_means.get("attention") if compensate else None)
        channels = keep[(index, "mlp")]
        if len(channels) < adapter.intermediate_size(layer):
            slice_mlp(adapter, layer, channels, scores.input_means.get("mlp") if compensate else None)

    def run(self, ctx: StageContext) -> dict:
        adapter = ctx.adapter
        capture = ctx.new_capture(2 if self.sequential else 1)
        scores: dict[int, LayerScores] = {}
        for index, layer in capture.layers():
            with input_stats(self.observed(adapter, layer)) as stats:
                outputs = capture.forward(index, layer)
            scores[index] = self.score_layer(index, adapter, layer, stats)
            if self.sequential:
                self.apply(adapter, index, layer, self.allocate({index: scores[index]}), scores[index])
                outputs = capture.forward(index, layer)
            capture.advance(outputs)
        if not self.sequential:
            keep = self.allocate(scores)
            for index, layer in enumerate(adapter.layers()):
                self.apply(adapter, index, layer, keep, scores[index])
        return {}
