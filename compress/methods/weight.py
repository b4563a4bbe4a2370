"""Weight-level methods: per-linear scores of single weights, masks (unstructured or N:M) and OWL.

`WeightMethod.run` walks the decoder layers with the layer-by-layer capture, collects each linear's
input statistics, asks the method for `linear_scores`, and zeroes the lowest-scored weights per
output row (or per N:M group); OWL gives each layer its own sparsity from outlier ratios.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn

from calibration.stats import ChannelStats, input_stats
from compress.errors import UserError
from compress.methods.base import Method, StageContext
from compress.ops.masks import apply_mask, make_mask, zero_fraction
from compress.ops.slicing import (
    decoder_linear_params,
    layer_linear_tensors,
    set_layer_linears,
)


class WeightMethod(Method):
    """Masks single weights of every decoder linear, one layer after the other.

    Each layer is scored from its inputs (statistics of every linear's input), masked, and run
    again so the next layer is calibrated on the pruned model's activations (`inputs: sequential`,
    the papers' choice); `inputs: dense` takes every layer's statistics from the dense model in a
    single pass per layer (about half the time).
    Two verbs: `linear_scores` (every method) scores each weight, `decide` turns scores into a mask (the
    default keeps the best per row or N:M group; `mask_group` picks the comparison group of unstructured
    masks). A method may `prepare` something first, e.g. gradients, or replace the per-layer step
    `prune_layer` altogether (SparseGPT updates the kept weights as it masks).

    `owl: true` (unstructured only) first runs the dense model once to measure each layer's
    outlier ratio (share of weights whose score exceeds `owl_threshold` x the layer's mean score)
    and gives layers with more outliers a lower sparsity, within +-`owl_lambda` of the target and
    with the same mean (OWL, Yin et al., ICML 2024, arXiv 2310.05175).
    """

    uses_activations: ClassVar[bool] = True
    mask_group: ClassVar[str] = "row"

    @abstractmethod
    def linear_scores(self, index: int, name: str, linear: nn.Linear, stats: ChannelStats | None) -> torch.Tensor:
        """Score of every weight of `linear` (layer `index`; higher = keep), from its input statistics."""

    def decide(self, index: int, name: str, linear: nn.Linear, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Keep-mask of `linear` from its weight scores: by default the highest-scored (1 - sparsity) of
        each comparison group (`mask_group`: a row, or the whole matrix) or N:M group."""

        cfg = self.config
        return make_mask(scores, sparsity, cfg.pattern, getattr(cfg, "group", self.mask_group))

    def prepare(self, ctx: StageContext) -> None:
        """Work done once before the layer loop (default: nothing)."""

    def prune_layer(self, index: int, linears: dict[str, nn.Module], groups: list[list[str]],
                    stats: dict[str, ChannelStats], sparsity: float) -> None:
        """Mask the `linears` of layer `index` in place (default: `linear_scores`, then `decide`, per linear).

        `groups` names the linears that read one input (the adapter's `input_groups`)."""
        for name, linear in linears.items():
            scores = self.linear_scores(index, name, linear, stats.get(name))
            apply_mask(linear, self.decide(index, name, linear, scores, sparsity))

    def second_moment_stride(self) -> int | None:
        """Token stride of the input second moments `prune_layer` needs (default: none)."""
        return None

    def layer_statistics(self, ctx: StageContext, advance: bool, resume=None, after_layer=None, moments=True):
        """Yield (index, layer, stats per linear) for every layer; sequential when `advance` is False, and
        once per level of `input_levels` (each a subset of the linears) with `within_layer`.

        `resume` = (depth, hidden states) continues from saved progress; `after_layer(index, capture)`
        runs once a layer's outputs have replaced its inputs; `moments=False` skips the second moments.
        """
        adapter = ctx.adapter
        if not self.uses_activations:
            for index, layer in enumerate(adapter.layers()):
                if resume is None or index >= resume[0]:
                    with adapter.onloaded(index):
                        yield index, layer, {}
            return
        within = getattr(self.config, "within_layer", False) and not advance
        capture = ctx.new_capture(1 if advance else (5 if within else 2))
        if resume is not None:
            capture.resume(*resume)
        for index, layer in capture.layers():
            linears = adapter.decoder_linears(layer)
            groups = adapter.input_groups(layer)
            stride = self.second_moment_stride() if moments else None
            # within the layer, the attention's last linear sees inputs that are final once q/k/v are
            # pruned, so the later passes do not run the attention again: its output is kept (o_proj's
            # inputs during the o level, then its outputs once it is pruned; N x heads x head_dim floats,
            # in memory). The MLP runs again in the outputs' pass: keeping down_proj's inputs (N x
            # intermediate floats, 400 MB for SmolLM2 at 128 x 512) in a file cost more time than recomputing
            # gate/up (docs/benchmarks.md)
            o_name = adapter.output_projection_paths()[0]
            replay = []
            # within the layer: one statistics pass per level, each after the levels before it were pruned
            for level in (input_levels(adapter, groups) if within else [groups]):
                record = linears[o_name] if within and len(level) == 1 and level[0][0] == o_name else None
                with input_stats({group[0]: linears[group[0]] for group in level}, stride,
                                 where=f"decoder layer {index}") as shared:
                    # a statistics-only pass stops once the level's last input is seen
                    capture.forward(index, layer, advance=advance, stop_at=None if advance else linears[level[-1][0]],
                                    record=record, replay=replay)
                yield index, layer, {name: shared[group[0]] for group in level for name in group}
                if record is not None:
                    replay.append((adapter.attention(layer), record))
            if not advance:  # outputs of the pruned layer feed the next
                capture.forward(index, layer, advance=True, replay=replay)
            if after_layer is not None:
                after_layer(index, capture)

    def owl_sparsities(self, ctx: StageContext) -> list[float]:
        """Per-layer sparsity from the dense model's outlier ratios (see the class doc)."""
        cfg = self.config
        ratios = []
        for index, layer, stats in self.layer_statistics(ctx, advance=True, moments=False):
            scores = [self.linear_scores(index, name, linear, stats.get(name)).reshape(-1)
                      for name, linear in ctx.adapter.decoder_linears(layer).items()]
            flat = torch.cat(scores)
            ratios.append(float((flat > cfg.owl_threshold * flat.mean()).float().mean()))
        return owl_allocation(ratios, self.sparsity, cfg.owl_lambda)

    def stage_sparsity(self, ctx: StageContext) -> float:
        """The share of zeros this stage puts in the weights it sees (`sparsity_of: model` converts the target)."""
        cfg = self.config
        if getattr(cfg, "sparsity_of", "stage") == "stage" or not ctx.linear_before:
            return cfg.sparsity
        now, before = decoder_linear_params(ctx.adapter), ctx.linear_before
        sparsity = (cfg.sparsity * before - (before - now)) / now
        if sparsity < 0:
            raise UserError(f"{cfg.method}: earlier stages already removed {1 - now / before:.1%} of the "
                            f"decoder-linear parameters, more than sparsity={cfg.sparsity:g} of the model; "
                            f"raise it or set sparsity_of=stage")
        ctx.log(f"{cfg.method}: {sparsity:.2%} of the remaining weights make {cfg.sparsity:.0%} of the model's")
        return sparsity

    def run(self, ctx: StageContext) -> dict:

        cfg, adapter, folder = self.config, ctx.adapter, ctx.folder
        self.sparsity = self.stage_sparsity(ctx)
        self.prepare(ctx)
        sparsities = None
        if getattr(cfg, "owl", False):
            saved = folder.load("owl") if folder is not None else None
            sparsities = saved[1]["layer_sparsity"] if saved else self.owl_sparsities(ctx)
            if folder is not None and not saved:
                folder.save("owl", {}, {"layer_sparsity": sparsities})
        zeros: dict[str, float] = {}
        resume = folder.load_hidden() if folder is not None else None
        if resume is not None:
            depth, hidden, _ = resume
            for index in range(depth):
                tensors, meta = folder.load_layer(index)
                with adapter.onloaded(index):
                    set_layer_linears(adapter, adapter.layers()[index], tensors)
                zeros.update(meta["zeros"])
            resume = (depth, hidden)
            ctx.log(f"resuming at layer {depth} from {folder.path}")

        def save_progress(index, capture):
            if folder is not None:
                layer = adapter.layers()[index]
                names = [f"layers.{index}.{name}" for name in adapter.decoder_linears(layer)]
                folder.save_layer(index, layer_linear_tensors(adapter, layer), {"zeros": {n: zeros[n] for n in names}})
                folder.checkpoint_hidden(index + 1, capture.hidden)

        untouched: list[str] = []
        dense_inputs = getattr(cfg, "inputs", "sequential") == "dense"
        for index, layer, stats in self.layer_statistics(ctx, advance=dense_inputs, resume=resume,
                                                         after_layer=save_progress):
            sparsity = self.sparsity if sparsities is None else sparsities[index]
            linears = adapter.decoder_linears(layer)
            idle = [name for name in linears if name in stats and stats[name].count == 0]
            untouched += [f"layers.{index}.{name}" for name in idle]  # experts the router never chose
            active = {n: lin for n, lin in linears.items() if n not in idle and (n in stats or not stats)}
            self.prune_layer(index, active, adapter.input_groups(layer), stats, sparsity)
            zeros.update({f"layers.{index}.{name}": zero_fraction(linears[name].weight) for name in [*active, *idle]})
        details = {"pattern": cfg.pattern, "zero_fraction_per_linear": zeros}
        if self.sparsity != cfg.sparsity:
            details["stage_sparsity"] = self.sparsity
        if untouched:
            details["untouched_no_calibration_tokens"] = untouched
            ctx.log(f"{len(untouched)} expert linears received no calibration tokens and were left as they are")
        if sparsities is not None:
            details["layer_sparsity"] = sparsities
        return details


def input_levels(adapter, groups: list[list[str]]) -> list[list[list[str]]]:
    """The input groups of a layer by depth: q/k/v, o, the MLP's inputs (gate/up of the MLP or of every
    expert), the down projections. A level's statistics can only be taken once the levels before it are pruned."""
    down = adapter.down_name
    mlp_in = [group for group in groups[2:] if not group[0].endswith(down)]
    mlp_out = [group for group in groups[2:] if group[0].endswith(down)]
    return [level for level in ([groups[0]], [groups[1]], mlp_in, mlp_out) if level]


def owl_allocation(outlier_ratios: list[float], sparsity: float, spread: float) -> list[float]:
    """Layer sparsities: fewer zeros where outliers are frequent, mean = `sparsity`, range 2 x `spread`."""
    ratios = torch.tensor(outlier_ratios, dtype=torch.float64)
    span = ratios.max() - ratios.min()
    if span <= 0:
        return [sparsity] * len(outlier_ratios)
    keep = (ratios - ratios.min()) / span * 2 * spread  # in [0, 2 spread], more outliers -> keep more
    keep = keep - keep.mean() + (1 - sparsity)
    return [float(min(max(1 - k, 0.0), 0.99)) for k in keep]
