"""Structured methods: the layer-by-layer loop, scoring hooks and slicing of KV groups and MLP channels.

A structured method only says which inputs it observes, how it scores units from the observed
statistics, and how scores become keep-decisions. `StructuredMethod.run` does the rest:

    for each decoder layer (layer-by-layer capture):
        collect input statistics of the observed linears  (one forward of the layer)
        score the layer's units
        sequential methods: decide for this layer, slice it, recompute its outputs
    global methods: decide once for all layers, then slice every layer
"""

from __future__ import annotations

import math
import tempfile
from abc import abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from calibration.stats import ChannelStats, input_stats
from compress.arch.base import Adapter
from compress.arch.moe import expert_linears
from compress.methods.base import (
    EXPERT_WIDTH_MULTIPLE,
    LayerScores,
    Method,
    StageContext,
)
from compress.ops.allocation import UnitScores, round_widths
from compress.ops.slicing import (
    LeastSquaresCompensation,
    MeanCompensation,
    attention_unit_params,
    layer_linear_tensors,
    mlp_unit_params,
    set_layer_linears,
    slice_attention,
    slice_experts,
    slice_mlp,
)
from compress.ops.units import ATTENTION, MLP, expert_channels, expert_of, is_expert_kind
from compress.workdir import save_atomic


class StoredLeastSquares:
    """Least-squares compensation whose statistics wait on disk until the global decision."""

    def __init__(self, path: Path, kind: str, damping: float):
        self.path, self.kind, self.damping = path, kind, damping

    def columns(self, linear, kept):
        tensors = load_file(self.path, device="cpu")
        solver = LeastSquaresCompensation(tensors[f"{self.kind}.mean"], tensors[f"{self.kind}.covariance"],
                                          self.damping, intercept=not is_expert_kind(self.kind))
        return solver.columns(linear, kept)


class StructuredMethod(Method):
    """Removes KV groups and MLP channels; subclasses implement `attention_scores`, `mlp_scores` and
    `allocate`."""

    sequential: ClassVar[bool] = False

    def observed(self, adapter: Adapter, layer: nn.Module) -> dict[str, nn.Linear]:
        """Output projections whose inputs are measured: "attention", and "mlp" or "mlp.<e>" per expert."""
        observed = {"attention": adapter.o_proj(layer)}
        experts = adapter.experts(layer)
        if experts is None:
            observed["mlp"] = adapter.down_proj(layer)
        else:

            observed.update({expert_channels(e): down for e, (_, _, down) in enumerate(expert_linears(experts))})
        return observed

    @abstractmethod
    def attention_scores(self, adapter: Adapter, layer: nn.Module, stats: ChannelStats) -> torch.Tensor:
        """Score of each KV group of the layer, from the statistics of o_proj's input."""

    @abstractmethod
    def mlp_scores(self, gate: nn.Module, up: nn.Module, down: nn.Module, stats: ChannelStats) -> torch.Tensor:
        """Score of each intermediate channel of one gated MLP (a layer's, or one expert's)."""

    def score_layer(self, index: int, adapter: Adapter, layer: nn.Module,
                    stats: dict[str, ChannelStats]) -> LayerScores:
        """Scores of the layer's attention units and MLP channels from its input statistics."""
        groups = self.attention_scores(adapter, layer, stats["attention"])
        if adapter.experts(layer) is None:
            gate, up = adapter.gate_up(layer)
            mlp = self.mlp_scores(gate, up, adapter.down_proj(layer), stats["mlp"])
            return LayerScores(units=self.unit_scores(index, adapter, layer, groups, mlp))
        slots, order, idle = self.expert_scores(adapter, layer, stats)
        return LayerScores(units=self.unit_scores(index, adapter, layer, groups, slots), expert_order=order,
                           idle_experts=idle)

    def expert_scores(self, adapter: Adapter, layer: nn.Module, stats: dict[str, ChannelStats]):
        """(slot scores [width], channel order per expert [experts, width], idle experts) of an MoE layer.

        Every expert of a layer must keep the same number of channels (one fused tensor), each its
        own best ones. Unit k ("slot" k) of the layer's width is the k-th best channel of every
        expert; it scores the mean of the experts' k-th best scores weighted by the share of
        calibration tokens routed to each expert, so a width decision keeps a prefix of the slots.
        An expert that received no token has no statistics: its channels are ranked by a data-free
        score, ||down[:, j]|| x ||up[j]|| x ||gate[j]||, it does not weigh on the slots, and it is reported.
        """

        rows, tokens, idle = [], [], []
        for e, (gate, up, down) in enumerate(expert_linears(adapter.experts(layer))):
            channel_stats = stats[expert_channels(e)]
            if channel_stats.count == 0:
                idle.append(e)
                norms = [w.detach().float().cpu().norm(dim=d) for w, d in ((down.weight, 0), (up.weight, 1),
                                                                            (gate.weight, 1))]
                rows.append(norms[0] * norms[1] * norms[2])
            else:
                rows.append(self.mlp_scores(gate, up, down, channel_stats).float())
            tokens.append(channel_stats.count)
        scores = torch.stack(rows)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        weights = torch.tensor(tokens, dtype=torch.float32)
        weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(weights))
        slots = (weights[:, None] * scores.gather(1, order)).sum(0)
        return slots, order, idle

    @abstractmethod
    def allocate(self, scores: dict[int, LayerScores]) -> dict[tuple[int, str], torch.Tensor]:
        """Kept unit indices per (layer, kind) for the layers in `scores`."""

    def decide(self, scores: dict[int, LayerScores]) -> dict[tuple[int, str], torch.Tensor]:
        """`allocate`, then MLP widths rounded to `round_to` (experts' widths to a multiple of
        EXPERT_WIDTH_MULTIPLE too: transformers' grouped-matmul experts need 16-byte strides)."""
        keep = self.allocate(scores)
        multiple = getattr(self.config, "round_to", 1)
        dense = [u for layer_scores in scores.values() if layer_scores.expert_order is None for u in layer_scores.units]
        moe = [u for layer_scores in scores.values() if layer_scores.expert_order is not None
               for u in layer_scores.units]
        keep = round_widths(dense, keep, multiple)
        return round_widths(moe, keep, math.lcm(multiple, EXPERT_WIDTH_MULTIPLE))

    def observe_layer(self, layer: nn.Module):
        """Context manager active while the layer runs on the calibration data; yields a dict that
        holds per-layer scalars once it exits (stored in `LayerScores.block`). Default: nothing."""
        return nullcontext({})

    def report_details(self, scores: dict[int, LayerScores]) -> dict:
        """Extra report entries once the stage is done (default: none)."""
        return {}

    def compensation_mode(self) -> str:
        return getattr(self.config, "compensation", "none")

    def compensations(self, index: int, stats: dict[str, ChannelStats], work_dir: Path | None) -> dict[str, object]:
        mode = self.compensation_mode()
        if mode == "none":
            return {}
        # experts carry no bias: no mean compensation, least squares through the origin; an expert
        # without calibration tokens has nothing to fit
        stats = {kind: s for kind, s in stats.items()
                 if not is_expert_kind(kind) or (s.count > 0 and mode == "least_squares")}
        if mode == "bias":
            return {kind: MeanCompensation(s.mean) for kind, s in stats.items()}
        damping = self.config.damping
        if self.sequential or work_dir is None:
            return {kind: LeastSquaresCompensation(s.mean, s.covariance(), damping, intercept=not is_expert_kind(kind))
                    for kind, s in stats.items()}
        path = Path(work_dir) / f"compensation-{index:04d}.safetensors"
        tensors = {}
        for kind, s in stats.items():
            tensors[f"{kind}.mean"] = (s.sum / s.count).cpu().contiguous()
            tensors[f"{kind}.covariance"] = s.covariance().float().cpu().contiguous()
        save_atomic(path, tensors)
        return {kind: StoredLeastSquares(path, kind, damping) for kind in stats}

    @staticmethod
    def unit_scores(index: int, adapter: Adapter, layer: nn.Module, attention: torch.Tensor,
                    mlp: torch.Tensor) -> list[UnitScores]:
        return [
            UnitScores(index, "attention", attention, attention_unit_params(adapter, layer),
                       removable=adapter.attention_prunable),
            UnitScores(index, "mlp", mlp, mlp_unit_params(adapter, layer)),
        ]

    def apply(self, adapter: Adapter, index: int, layer: nn.Module, keep: dict, scores: LayerScores) -> None:
        groups = keep[(index, "attention")]
        if len(groups) < adapter.attention_shape(layer).num_kv_heads:
            slice_attention(adapter, layer, groups, scores.compensation.get("attention"))
        channels = keep[(index, "mlp")]
        if len(channels) >= adapter.intermediate_size(layer):
            return
        if scores.expert_order is None:
            slice_mlp(adapter, layer, channels, scores.compensation.get("mlp"))
        else:  # every expert keeps its own best len(channels) channels
            compensations = [scores.compensation.get(expert_channels(e)) for e in range(len(scores.expert_order))]
            slice_experts(adapter, layer, scores.expert_order[:, :len(channels)], compensations)

    def run(self, ctx: StageContext) -> dict:
        if ctx.folder is None and self.compensation_mode() == "least_squares" and not self.sequential:
            with tempfile.TemporaryDirectory(prefix="compress-work-") as work_dir:
                return self._run(ctx, Path(work_dir))
        return self._run(ctx, ctx.folder.path if ctx.folder is not None else None)

    def _run(self, ctx: StageContext, work_dir: Path | None) -> dict:
        adapter, folder = ctx.adapter, ctx.folder
        capture = ctx.new_capture(2 if self.sequential else 1)
        stride = self.config.covariance_token_stride if self.compensation_mode() == "least_squares" else None
        scores: dict[int, LayerScores] = {}
        saved = folder.load_hidden() if folder is not None else None
        if saved is not None:  # resume: layers before `depth` are decided (and, if sequential, sliced)
            depth, hidden, _ = saved
            for index in range(depth):
                tensors, meta = folder.load_layer(index)
                if self.sequential:
                    with adapter.onloaded(index):
                        set_layer_linears(adapter, adapter.layers()[index], tensors)
                else:
                    scores[index] = self._scores_from(index, tensors, meta, work_dir)
            capture.resume(depth, hidden)
            ctx.log(f"resuming at layer {depth} from {folder.path}")
        for index, layer in capture.layers():
            observed = self.observed(adapter, layer)
            labels = dict(zip((ATTENTION, MLP), adapter.output_projection_paths()))
            labels.update({kind: f"{adapter.mlp_name}.experts.{expert_of(kind)}.down_proj" for kind in observed
                           if is_expert_kind(kind)})
            with input_stats(observed, stride, f"decoder layer {index}", labels) as stats, \
                    self.observe_layer(layer) as block:
                capture.forward(index, layer, advance=not self.sequential)
            scores[index] = self.score_layer(index, adapter, layer, stats)
            scores[index].block = dict(block)
            scores[index].compensation = self.compensations(index, stats, work_dir)
            del stats
            if self.sequential:
                self.apply(adapter, index, layer, self.decide({index: scores[index]}), scores[index])
                capture.forward(index, layer, advance=True)
            if folder is not None:
                if self.sequential:
                    folder.save_layer(index, layer_linear_tensors(adapter, layer))
                else:
                    folder.save_layer(index, *self._scores_to(scores[index]))
                folder.checkpoint_hidden(index + 1, capture.hidden)
        del capture
        if not self.sequential:
            keep = self.decide(scores)
            for index, layer in enumerate(adapter.layers()):
                with adapter.onloaded(index):
                    self.apply(adapter, index, layer, keep, scores[index])
        details = self.report_details(scores)
        idle = [f"layers.{i}.{adapter.mlp_name}.experts.{e}" for i in sorted(scores) for e in scores[i].idle_experts]
        if idle:
            details["experts_without_calibration_tokens"] = idle
            ctx.log(f"{len(idle)} experts received no calibration tokens: their channels were ranked by weight norms")
        return details

    def _scores_to(self, layer_scores: LayerScores) -> tuple[dict, dict]:
        """A layer's scores (and mean compensation) as tensors + metadata for the work folder."""
        tensors = {f"{u.kind}.scores": u.scores for u in layer_scores.units}
        meta = {"unit_params": {u.kind: u.unit_params for u in layer_scores.units}, "block": layer_scores.block,
                "compensated": sorted(layer_scores.compensation), "idle_experts": layer_scores.idle_experts,
                "fixed": [u.kind for u in layer_scores.units if not u.removable]}
        if layer_scores.expert_order is not None:
            tensors["mlp.expert_order"] = layer_scores.expert_order.contiguous()
        for kind, comp in layer_scores.compensation.items():
            if isinstance(comp, MeanCompensation):
                tensors[f"{kind}.mean"] = comp.mean
        return tensors, meta

    def _scores_from(self, index: int, tensors: dict, meta: dict, work_dir: Path | None) -> LayerScores:
        units = [UnitScores(index, kind, tensors[f"{kind}.scores"], params, removable=kind not in meta.get("fixed", []))
                 for kind, params in meta["unit_params"].items()]
        mode = self.compensation_mode()
        kinds = meta.get("compensated", [u.kind for u in units])
        compensation = {}
        if mode == "bias":
            compensation = {kind: MeanCompensation(tensors[f"{kind}.mean"]) for kind in kinds}
        elif mode == "least_squares":
            path = Path(work_dir) / f"compensation-{index:04d}.safetensors"
            compensation = {kind: StoredLeastSquares(path, kind, self.config.damping) for kind in kinds}
        return LayerScores(units=units, compensation=compensation, block=meta.get("block", {}),
                           expert_order=tensors.get("mlp.expert_order"), idle_experts=meta.get("idle_experts", []))
