"""Týr-the-Pruner: a global search of every layer's sparsity on a supernet of locally pruned layers
(Li et al., NeurIPS 2025, arXiv 2503.09657). The guide's Týr section has the details.

* Local pruning, per layer and kind (KV groups, MLP channels), at every count of a round's grid:
  greedy OBS order (`criterion: obs`) or FLAP's WIFV (`wifv`), kept columns re-fit by least squares.
* Supernet (`compress.ops.supernet`): the candidates on disk as kept indices + compensation deltas;
  each layer is built on the expected output of the previous layer's candidates
  (`accumulation: expectation`, the paper's) or on dense inputs (`dense`, the released code's).
* Search (`compress.ops.search`): attention and MLP budgets (the same share of each) spread evenly,
  then evolved by budget-neutral moves under KL(dense || pruned) on held calibration windows,
  coarse to fine over `rounds` (the step halves each round).
* The chosen counts are applied layer by layer on the already pruned layers' outputs (attention,
  then the MLP measured behind it); the report lists the ratios, the export has a PNG of them.

    - method: tyr
      sparsity: 0.5
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from calibration.capture import LayerwiseCapture
from calibration.stats import input_stats
from compress.config import StructuredStageConfig
from compress.errors import UserError
from compress.export.plots import layer_bars_png
from compress.methods.base import Method, StageContext
from compress.methods.flap import channel_metric
from compress.methods.registry import register
from compress.ops.obs import removal_order
from compress.ops.search import Grid, SearchState, evolve, key_name, parse_key, spread_budget
from compress.ops.slicing import (
    LeastSquaresCompensation,
    attention_unit_params,
    group_channels,
    layer_linear_tensors,
    mlp_unit_params,
    set_layer_linears,
    slice_attention,
    slice_mlp,
)
from compress.ops.supernet import KlFitness, Supernet, expected_outputs

KINDS = ("attention", "mlp")


class TyrConfig(StructuredStageConfig):
    method: Literal["tyr"] = "tyr"
    criterion: Literal["obs", "wifv"] = Field("obs", description="local order of removal: greedy OBS or FLAP's WIFV")
    accumulation: Literal["expectation", "dense"] = Field(
        "expectation", description="inputs of the supernet's layers: expected pruned outputs, or dense (released code)")
    expectation_variants: int = Field(3, ge=1, description="candidates of a layer averaged for the next one's inputs")
    rounds: int = Field(3, ge=1, description="coarse-to-fine rounds (the step halves each round)")
    levels: int = Field(9, ge=3, description="counts per layer and kind in a round's grid (odd)")
    step: float = Field(0.125, gt=0, lt=1, description="first round's step, as a share of a layer's units")
    min_step: int = Field(32, ge=1, description="smallest step in MLP channels")
    per_round: int = Field(16, ge=1, description="MLP channels removed per greedy OBS round")
    generations: int = Field(8, ge=0, description="generations per round")
    offspring: int = Field(16, ge=1, description="children per generation")
    survivors: list[int] = Field([4], description="children kept after each selection stage but the last")
    fitness_windows: int = Field(4, ge=1, description="calibration windows held out for the fitness")
    stage_windows: list[int] = Field([1, 4], description="fitness windows of each selection stage")
    kl_top: int = Field(2048, ge=1, description="KL over the dense model's top-k tokens of each position")
    supernet_dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0

    @model_validator(mode="after")
    def _stages(self):
        if len(self.stage_windows) != len(self.survivors) + 1:
            raise UserError("tyr: stage_windows needs one entry per selection stage (len(survivors) + 1)")
        if max(self.stage_windows) > self.fitness_windows or sorted(self.stage_windows) != self.stage_windows:
            raise UserError(f"tyr: stage_windows must ascend and stay within fitness_windows ({self.fitness_windows})")
        return self

    def check_model(self, view, number: int, recipe) -> None:
        if view.known and view.is_moe:
            raise UserError(f"stage {number} (tyr) prunes dense decoder layers; for a mixture-of-experts model use "
                            f"stun (experts) or flap (expert channels)")
        if self.fitness_windows >= recipe.calibration.num_samples:
            raise UserError(f"stages.{number}.fitness_windows={self.fitness_windows} leaves no calibration window to "
                            f"build on (calibration.num_samples={recipe.calibration.num_samples})")


@register
class Tyr(Method):
    name = "tyr"
    Config = TyrConfig

    # ---- local pruning ---------------------------------------------------------------------
    def local_order(self, adapter, layer, kind: str, stats, count: int) -> list[int]:
        """The first `count` units of `kind` that leave the layer, cheapest first."""
        cfg = self.config
        if kind == "attention":
            shape, out = adapter.attention_shape(layer), adapter.o_proj(layer)
            units = torch.stack([group_channels(shape, torch.tensor([g]))[0] for g in range(shape.num_kv_heads)])
        else:
            out = adapter.down_proj(layer)
            units = torch.arange(out.in_features)[:, None]
        if cfg.criterion == "wifv":
            scores = channel_metric("WIFV", out.weight, stats)[units].sum(1)
            return torch.sort(scores, stable=True).indices[:count].tolist()
        return removal_order(out.weight, stats.covariance(), units, count, 1 if kind == "attention" else cfg.per_round,
                             cfg.damping, f"{kind} of a decoder layer")

    @staticmethod
    def kept(adapter, layer, kind: str, removed: list[int]) -> torch.Tensor:
        width = adapter.attention_shape(layer).num_kv_heads if kind == "attention" else adapter.intermediate_size(layer)
        mask = torch.ones(width, dtype=torch.bool)
        mask[removed] = False
        return mask.nonzero().flatten()

    def candidates(self, adapter, layer, stats, counts: dict[str, list[int]]) -> dict:
        """(kind, count) -> (kept units, delta of the output projection's kept columns, bias shift)."""
        result = {}
        for kind, wanted in counts.items():
            wanted = [c for c in wanted if c > 0]
            if not wanted:
                continue
            order = self.local_order(adapter, layer, kind, stats[kind], max(wanted))
            solver = LeastSquaresCompensation(stats[kind].mean, stats[kind].covariance(), self.config.damping)
            out = adapter.o_proj(layer) if kind == "attention" else adapter.down_proj(layer)
            for count in wanted:
                kept = self.kept(adapter, layer, kind, order[:count])
                columns = group_channels(adapter.attention_shape(layer), kept)[0] if kind == "attention" else kept
                fitted = solver.columns(out, columns)
                bias = fitted.bias.detach().float() - (out.bias.detach().float() if out.bias is not None else 0)
                result[(kind, count)] = (kept, fitted.weight.detach() - out.weight.detach()[:, columns], bias)
        return result

    # ---- budget ----------------------------------------------------------------------------
    def budget(self, adapter) -> tuple[dict, dict, dict, dict]:
        """(centre, limits, unit params, units) per (layer, kind): the budget spread evenly."""
        cfg = self.config
        layers = list(adapter.layers())
        units, params, limits = {}, {}, {}
        for index, layer in enumerate(layers):
            units[(index, "attention")] = adapter.attention_shape(layer).num_kv_heads
            params[(index, "attention")] = attention_unit_params(adapter, layer)
            units[(index, "mlp")] = adapter.intermediate_size(layer)
            params[(index, "mlp")] = mlp_unit_params(adapter, layer)
        kinds = [k for k in KINDS if k == "mlp" or adapter.attention_prunable]
        granules = {"attention": 1, "mlp": cfg.round_to}
        for key in units:
            granule = granules[key[1]]
            limits[key] = (units[key] - cfg.min_units) // granule * granule if key[1] in kinds else 0
        target = cfg.sparsity * sum(units[key] * params[key] for key in units)
        try:
            centre = spread_budget(target, units, params, limits, granules)
        except ValueError as err:
            raise UserError(f"tyr: sparsity {cfg.sparsity} {err} with min_units={cfg.min_units}; lower the "
                            f"sparsity") from None
        return centre, limits, params, units

    def steps(self, units: dict, round_: int) -> dict:
        cfg = self.config
        steps = {}
        for key, count in units.items():
            floor, granule = (1, 1) if key[1] == "attention" else (cfg.min_step, cfg.round_to)
            step = max(floor, round(cfg.step * count / 2 ** round_))
            steps[key] = max(granule, round(step / granule) * granule)
        return steps

    # ---- the stage -------------------------------------------------------------------------
    def run(self, ctx: StageContext) -> dict:
        if any(ctx.adapter.experts(layer) is not None for layer in ctx.adapter.layers()):
            raise UserError("tyr prunes dense decoder layers; use stun or flap on a mixture-of-experts model")
        if ctx.folder is None:
            with tempfile.TemporaryDirectory(prefix="compress-tyr-") as work:
                return self._run(ctx, Path(work))
        return self._run(ctx, ctx.folder.path)

    def _run(self, ctx: StageContext, work: Path) -> dict:
        cfg, adapter, folder = self.config, ctx.adapter, ctx.folder
        held = ctx.windows[-cfg.fitness_windows:]
        build = ctx.windows[:-cfg.fitness_windows]
        centre, limits, params, units = self.budget(adapter)
        rounds, fitness = [], None
        for round_ in range(cfg.rounds):
            done = folder.load(f"round-{round_}") if folder is not None else None
            if done is not None:
                rounds.append(done[1]["round"])
                centre = {parse_key(name): count for name, count in done[1]["centre"].items()}
                continue
            steps = self.steps(units, round_)
            grid = Grid.around(centre, steps, limits, params, cfg.levels // 2)
            start = time.perf_counter()
            supernet = Supernet(work, round_, getattr(torch, cfg.supernet_dtype))
            self.build(ctx, supernet, grid, build, round_)
            built = time.perf_counter()
            if fitness is None:
                fitness = KlFitness(adapter, held, cfg.stage_windows, cfg.kl_top)
            fitness.use(supernet, centre)
            state = SearchState(parent=dict(centre), fitness=fitness(centre, -1))
            first = state.fitness
            rng = random.Random(cfg.seed * 1_000_003 + round_)
            bar = ctx.make_bar(f"round {round_ + 1}/{cfg.rounds} search", cfg.generations, "gen") \
                if ctx.make_bar else None
            for _ in range(cfg.generations):
                evolve(state, grid, rng, fitness, cfg.offspring, cfg.survivors)
                fitness.set_parent(state.parent)
                if bar is not None:
                    bar.set_postfix(kl=f"{state.fitness:.4f}")
                    bar.update(1)
            centre = state.parent
            record = {"step": {"attention": steps[(0, "attention")], "mlp": steps[(0, "mlp")]},
                      "generations": cfg.generations, "evaluations": state.evaluations,
                      "kl_centre": round(first, 6), "kl_best": round(state.fitness, 6),
                      "kl_history": [round(v, 6) for v in state.history], "supernet_bytes": supernet.size_bytes(),
                      "build_seconds": round(built - start, 1), "search_seconds": round(time.perf_counter() - built, 1)}
            rounds.append(record)
            ctx.log(f"tyr round {round_ + 1}: KL {first:.4f} -> {state.fitness:.4f} ({state.evaluations} evaluations, "
                    f"supernet {record['supernet_bytes'] / 2**20:.0f} MiB)")
            if folder is not None:  # before the supernet goes: a resumed run must not rebuild on missing files
                folder.save(f"round-{round_}", {}, {"round": record,
                                                    "centre": {key_name(k): v for k, v in centre.items()}})
            supernet.remove()
        if fitness is None:  # every round restored from the work folder: the model is still dense here
            fitness = KlFitness(adapter, held, cfg.stage_windows, cfg.kl_top)
        self.apply(ctx, centre)
        return self.details(ctx, centre, units, rounds, fitness)

    def build(self, ctx, supernet: Supernet, grid: Grid, windows: torch.Tensor, round_: int) -> None:
        """The round's candidates of every layer, on expected (or dense) inputs; resumable per layer."""
        cfg, adapter, folder = self.config, ctx.adapter, ctx.folder
        bar = ctx.make_bar(f"round {round_ + 1}/{cfg.rounds} supernet", adapter.num_layers(), "layer") \
            if ctx.make_bar else None
        capture = LayerwiseCapture(adapter, windows, ctx.calibration_batch_size)
        saved = folder.load_hidden() if folder is not None else None
        if saved is not None and saved[2].get("phase") == f"build-{round_}":
            capture.resume(saved[0], saved[1])
        for index, layer in capture.layers():
            observed = {"attention": adapter.o_proj(layer), "mlp": adapter.down_proj(layer)}
            dense = cfg.accumulation == "dense"
            with input_stats(observed, cfg.covariance_token_stride, f"decoder layer {index}") as stats:
                capture.forward(index, layer, advance=dense)
            counts = {kind: grid.levels[(index, kind)] for kind in KINDS}
            supernet.save_layer(index, self.candidates(adapter, layer, stats, counts))
            del stats
            if not dense:
                capture.hidden = expected_outputs(adapter, supernet, capture, index, layer, counts,
                                                  cfg.expectation_variants)
            if folder is not None:
                folder.checkpoint_hidden(index + 1, capture.hidden, {"phase": f"build-{round_}"})
            if bar is not None:
                bar.update(1)

    def apply(self, ctx, chosen: dict) -> None:
        """Prune every layer to the chosen counts, on inputs from the already pruned layers."""
        cfg, adapter, folder = self.config, ctx.adapter, ctx.folder
        capture = ctx.new_capture(3)
        saved = folder.load_hidden() if folder is not None else None
        if saved is not None and saved[2].get("phase") == "final":
            for index in range(saved[0]):
                with adapter.onloaded(index):
                    set_layer_linears(adapter, adapter.layers()[index], folder.load_layer(index)[0])
            capture.resume(saved[0], saved[1])
        stride = cfg.covariance_token_stride
        for index, layer in capture.layers():
            for kind in KINDS:
                out = adapter.o_proj(layer) if kind == "attention" else adapter.down_proj(layer)
                with input_stats({kind: out}, stride, f"decoder layer {index}") as stats:
                    stop = adapter.mlp(layer) if kind == "attention" else None
                    capture.forward(index, layer, advance=False, stop_at=stop)
                count = chosen[(index, kind)]
                if count:
                    kept = self.kept(adapter, layer, kind, self.local_order(adapter, layer, kind, stats[kind], count))
                    solver = LeastSquaresCompensation(stats[kind].mean, stats[kind].covariance(), cfg.damping)
                    (slice_attention if kind == "attention" else slice_mlp)(adapter, layer, kept, solver)
            capture.forward(index, layer, advance=True)
            if folder is not None:
                folder.save_layer(index, layer_linear_tensors(adapter, layer))
                folder.checkpoint_hidden(index + 1, capture.hidden, {"phase": "final"})

    def details(self, ctx, chosen: dict, units: dict, rounds: list, fitness) -> dict:
        adapter = ctx.adapter
        layers = range(adapter.num_layers())
        ratio = {kind: [round(chosen[(i, kind)] / units[(i, kind)], 4) for i in layers] for kind in KINDS}
        details = {"kept_kv_groups": [units[(i, "attention")] - chosen[(i, "attention")] for i in layers],
                   "kept_mlp_channels": [units[(i, "mlp")] - chosen[(i, "mlp")] for i in layers],
                   "layer_sparsity": ratio, "rounds": rounds, "fitness_windows": self.config.fitness_windows}
        fitness.supernet, fitness.parent, fitness.cache = None, None, []  # the pruned model against the dense teacher
        details["kl_final"] = round(fitness({}, -1), 6)
        title = f"Týr {self.config.sparsity:.0%}: removed share of each layer"
        ctx.artifacts["tyr_sparsity.png"] = layer_bars_png({"attention (KV groups)": ratio["attention"],
                                                            "MLP channels": ratio["mlp"]}, title)
        return details
