"""ARMOR: N:M sparse cores between learned block-diagonal factors (Liu et al., ICLR 2026, arXiv 2510.05528).

Every decoder linear W becomes W ~ diag(c) A (S * M) B diag(r) (`compress.ops.factorized`): the N:M core
S * M keeps the 2:4 speed-up, A and B are block-diagonal (`block_size` x `block_size` blocks) and cost
block x (in + out) parameters per linear (+18.4% of SmolLM2's decoder linears at block 64).

1. Start: `init: sparsegpt` (default; the mask and values of our SparseGPT's sweep, no re-fit), `wanda`, or `nowag`
   (the paper's NoWag-P: in every group of M inputs of a row the N largest Wn^2 h, values Wn).
2. The loss. `hessian: full` (default, beyond the paper): the layer-wise reconstruction error
   ||(W - W-hat) X||^2 / ||W X||^2 on E[x x^T], with `inputs: pruned` and init=sparsegpt the Hessians
   SparseGPT measured on the pruned inputs (no extra pass); A, B and the core values are optimised, the
   mask stays SparseGPT's. `hessian: diagonal` with `inputs: dense`: the paper's proxy on h = 2 mean(x^2)
   of the dense model's inputs (`init: nowag` too: the paper's algorithm), with the discrete mask step.
   On SmolLM2 2:4 the full loss gives 59.49 quick ppl, the diagonal proxy 85.38 (worse than its
   SparseGPT start, 77.22: it undoes the OBS compensation the diagonal cannot see), docs/benchmarks.md.
3. Block coordinate descent, all linears of one name and shape across the layers as one stacked tensor
   program: (diagonal) the exact discrete step per tile, then an Adam step on A, B, S with the gradients
   of the same forward (the reference code runs a second forward for the discrete step); per matrix
   early stopping after `patience` iterations without improvement, as the reference code.
   `iterations` per linear, or as many as `time_budget_s` allows (shared by the stacks by their cost).
4. The linears become `FactorizedLinear` (A' = diag(c) A, core, B' = B diag(r)); the export ships the
   modelling file that rebuilds them (`trust_remote_code=True`; `compress.load` uses the package's copy).

Recipe: recipes/armor_2_4.yaml; every key: docs/guide.md (ARMOR).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from calibration.stats import input_stats
from compress.config import StageConfig
from compress.errors import UserError
from compress.methods.base import Method, StageContext
from compress.methods.registry import register
from compress.model.modeling_pruned import FactorizedLinear
from compress.ops.factorized import FactorStack, nowag_normalise
from compress.ops.masks import nm_mask, parse_pattern

BLOCKS = (128, 64, 32)


class ArmorConfig(StageConfig):
    method: Literal["armor"] = "armor"
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="implied by the pattern: 1 - N/M")
    pattern: str = Field("2:4", description="N:M pattern of the sparse core")
    init: Literal["sparsegpt", "wanda", "nowag"] = Field(
        "sparsegpt", description="the starting mask and values: our SparseGPT or Wanda, or NoWag-P (the paper)")
    block_size: int | None = Field(None, ge=4, description="side of the blocks of A and B; null: the largest of "
                                                          "128/64/32 dividing both dimensions of each linear")
    iterations: int = Field(250, ge=0, description="block coordinate descent iterations per linear")
    time_budget_s: float | None = Field(None, gt=0, description="stop the iterations after this many seconds "
                                                                "in all (shared by the linears by their cost)")
    learning_rate: float = Field(1e-4, gt=0, description="Adam's step size on A, B and S")
    patience: int = Field(100, ge=1, description="stop a linear after this many iterations without improvement")
    sampling: Literal["gradient", "greedy"] = Field(
        "gradient", description="the group updated per tile: sampled by gradient L1 (the paper) or the largest")
    hessian: Literal["diagonal", "full"] = Field(
        "full", description="the loss: ARMOR's proxy on h = diag(E[x x^T]) with the discrete mask step, or "
                                "the layer-wise loss ||(W - W-hat) X||^2 on the full E[x x^T] (A, B and the "
                                "values only; the mask stays the start's)")
    inputs: Literal["dense", "pruned"] = Field(
        "pruned", description="statistics from the model after the initial pruning (with init=sparsegpt and "
                              "hessian=full: SparseGPT's own Hessians, no extra pass) or from the dense model "
                              "(ARMOR)")
    stack_layers: int | None = Field(None, ge=1, description="at most this many layers' linears in one stacked "
                                                            "program (null: all; smaller = less memory)")
    eval_at: list[int] = Field([], description="measure the quick ppl after these iterations (a quality-vs-time "
                                               "curve in the report; every stack in memory at once)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        try:
            nm = parse_pattern(self.pattern)
        except Exception as err:
            raise ValueError(str(err)) from None
        if nm is None:
            raise ValueError("armor factorizes an N:M sparse core: set pattern to N:M, e.g. '2:4'")
        if abs(self.sparsity - (implied := 1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"pattern {self.pattern} keeps {nm[0]} in {nm[1]}: set sparsity={implied:g}")
        if self.block_size is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={nm[1]}")
        return self

    def check_model(self, view, number: int, recipe) -> None:
        if view.is_moe:
            raise UserError("armor factorizes dense decoder linears; the experts of a mixture-of-experts (MoE) "
                            "layer are fused banks: use sparsegpt or wanda with pattern=2:4 for them")
        if recipe.stages[number + 1:]:
            raise UserError(f"stage {number + 1} ({recipe.stages[number + 1].method}) after armor (stage {number}): "
                            f"the factorized linears are final; put armor last")
        for before, earlier in enumerate(recipe.stages[:number]):  # structured widths must fit the blocks
            if getattr(earlier, "round_to", None) and earlier.round_to % (self.block_size or 32):
                raise UserError(f"stage {before} ({earlier.method}) may leave MLP widths that no block divides; "
                                f"set stages.{before}.round_to={self.block_size or 32} (a multiple of the block)")
        widths = [w for key, w in view.input_widths().items() if isinstance(w, int) and key != "head_dim"]
        blocks = [self.block_size] if self.block_size else list(BLOCKS)
        for width in widths:
            if not any(width % b == 0 for b in blocks):
                raise UserError(f"stage {number} (armor): the model's width {width} is not a multiple of "
                                f"{' or '.join(map(str, blocks))}; set stages.{number}.block_size to a divisor "
                                f"of every width that is a multiple of 4")


def block_for(rows: int, cols: int, block: int | None, m: int, name: str) -> int:
    """The configured block, or the largest of BLOCKS dividing both dimensions."""
    for b in ([block] if block else BLOCKS):
        if rows % b == 0 and cols % b == 0 and b % m == 0:
            return b
    raise UserError(f"{name} ({rows} x {cols}): no block size among {block or BLOCKS} divides both dimensions; set "
                    f"block_size to a common divisor (a multiple of {m})")


@register
class Armor(Method):
    name = "armor"
    Config = ArmorConfig

    def input_moments(self, ctx: StageContext, full: bool) -> dict[tuple[int, str], torch.Tensor]:
        """h = 2 mean(x^2) of every decoder linear's input (`full`: E[x x^T]), one pass over the model as it is."""
        adapter, found = ctx.adapter, {}
        capture = ctx.new_capture(1)
        for index, layer in capture.layers():
            linears = adapter.decoder_linears(layer)
            groups = adapter.input_groups(layer)
            with input_stats({g[0]: linears[g[0]] for g in groups}, 1 if full else None,
                             where=f"decoder layer {index}") as stats:
                capture.forward(index, layer, advance=True)
            for group in groups:
                s = stats[group[0]]
                moment = s.second_moment().float().cpu() if full else (
                    2 * s.l2_norm.double().square() / max(s.count, 1)).float()
                found.update({(index, name): moment for name in group})
        return found

    def initial_pruning(self, ctx: StageContext) -> dict:
        """Run the `init` method (SparseGPT or Wanda) with this stage's pattern; its weights are the start."""
        from compress.methods.registry import get_method
        cfg = self.config
        method_class = get_method(cfg.init)
        extra = {"refit_iterations": 0} if cfg.init == "sparsegpt" else {}  # the sweep alone: ARMOR re-fits
        method = method_class(method_class.Config(method=cfg.init, sparsity=cfg.sparsity, pattern=cfg.pattern, **extra))
        ctx.log(f"armor: initial {cfg.pattern} masks from {cfg.init}")
        if cfg.hessian == "full" and cfg.init == "sparsegpt" and cfg.inputs == "pruned":
            method.hessians = self.hessians = {}  # SparseGPT's own Hessians, measured on the pruned inputs
        details = method.run(dataclasses.replace(ctx, folder=None))
        details.pop("zero_fraction_per_linear", None)
        return details

    def run(self, ctx: StageContext) -> dict:
        cfg, adapter = self.config, ctx.adapter
        if adapter.offload_store is not None:
            raise UserError("armor keeps every decoder linear's dense weights while it factorizes: it needs the "
                            "layers in memory or on a GPU, not on disk; drop max_memory/device_map")
        n, m = parse_pattern(cfg.pattern)
        layers = adapter.layers()
        dense = {(index, name): linear.weight.detach().float().cpu().clone()
                 for index, layer in enumerate(layers) for name, linear in adapter.decoder_linears(layer).items()}
        details: dict = {"pattern": cfg.pattern, "init": cfg.init}
        full, self.hessians = cfg.hessian == "full", None
        h = self.input_moments(ctx, full) if cfg.inputs == "dense" or cfg.init == "nowag" else None
        if cfg.init != "nowag":
            details["init_details"] = self.initial_pruning(ctx)
            if cfg.inputs == "pruned":
                h = self.hessians or self.input_moments(ctx, full)
        self.hessians = None
        stacks: dict[tuple, list[tuple[int, str]]] = {}
        for key, weight in dense.items():
            b = block_for(*weight.shape, cfg.block_size, m, f"layers.{key[0]}.{key[1]}")
            stacks.setdefault((key[1], *weight.shape, b, key[0] // (cfg.stack_layers or len(layers))), []).append(key)
        cost = {group: len(keys) * group[1] * group[2] * group[3] for group, keys in stacks.items()}
        started, summary, curve, paused = time.perf_counter(), {}, [], [0.0]  # paused: seconds of evaluation
        generator, greedy = torch.Generator().manual_seed(cfg.seed), cfg.sampling == "greedy"
        bar = ctx.make_bar("armor", cfg.iterations * len(stacks), "it") if ctx.make_bar and cfg.iterations else None

        def advance(search, budget):
            loss = search.step(generator, greedy, cfg.patience)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{search.name} proxy loss {loss.mean():.4f}")
            return time.perf_counter() - started - paused[0] < budget

        if not cfg.eval_at:  # one stack after the other: at most one stack's tensors in memory
            for group, keys in stacks.items():
                search = self._search(group, keys, dense, h, adapter, n, m)
                budget = math.inf if cfg.time_budget_s is None else cfg.time_budget_s * cost[group] / sum(
                    cost.values()) + time.perf_counter() - started
                while search.done < cfg.iterations and search.alive and advance(search, budget):
                    pass
                summary.update(search.install(self, adapter))
        else:  # every stack at once, the model measured at the iterations of eval_at
            searches = [self._search(group, keys, dense, h, adapter, n, m) for group, keys in stacks.items()]
            budget = math.inf if cfg.time_budget_s is None else cfg.time_budget_s
            for iteration in range(cfg.iterations + 1):
                if iteration in cfg.eval_at or iteration == cfg.iterations:
                    for search in searches:
                        summary.update(search.install(self, adapter))
                    if ctx.evaluate is not None and iteration in cfg.eval_at:
                        clock = time.perf_counter()
                        searched = round(clock - started - paused[0], 1)  # seconds of search so far
                        curve.append({"iteration": iteration, "seconds": searched,
                                      "ppl": ctx.evaluate(f"armor iteration {iteration}")})
                        paused[0] += time.perf_counter() - clock
                        ctx.log(f"armor: iteration {iteration}, quick ppl {curve[-1]['ppl']:.2f}")
                if iteration == cfg.iterations or not all([advance(s, budget) for s in searches if s.alive]):
                    break
            for search in searches:
                summary.update(search.install(self, adapter))
            details["curve"] = curve
        if bar is not None:
            bar.close()
        added = sum(info["factor_params"] for info in summary.values())
        dense_params = sum(w.numel() for w in dense.values())
        details.update({"stacks": summary, "seconds_factorization": round(time.perf_counter() - started, 1),
                        "factor_params": added, "factor_overhead": round(added / dense_params, 4)})
        ctx.log(f"armor: +{added:,} factor parameters ({added / dense_params:.1%} of the decoder linears)")
        return details

    def _search(self, group, keys, dense, h, adapter, n, m) -> "Search":
        """The stack of one group of linears, started from `init`'s masks and values."""
        cfg, (name, rows, cols, b, _chunk) = self.config, group
        weights = torch.stack([dense[key] for key in keys])
        hessian = torch.stack([h[key] for key in keys]) if cfg.hessian == "full" else None
        hs = hessian.diagonal(dim1=-2, dim2=-1) * 2 if hessian is not None else torch.stack([h[key] for key in keys])
        if cfg.init == "nowag":
            wn = nowag_normalise(weights)[0]
            keep = nm_mask((wn.square() * hs.unsqueeze(1)).reshape(-1, cols), n, m).reshape(weights.shape)
            values = None
        else:
            values = torch.stack([self._linear(adapter, key).weight.detach().float().cpu() for key in keys])
            # the start's zeros; a kept weight that is exactly 0 still holds its place in the N:M group
            ranking = (values != 0).float() * 2 + (weights.abs() / (weights.abs().max() + 1)).clamp(max=0.5)
            keep = nm_mask(ranking.reshape(-1, cols), n, m).reshape(weights.shape)
        label = f"{name} {rows}x{cols}" + (f" layers {keys[0][0]}-{keys[-1][0]}" if cfg.stack_layers else "")
        return Search(FactorStack(weights, hs, keep, values, n, m, b, cfg.learning_rate, hessian), keys, label)

    @staticmethod
    def _linear(adapter, key):
        return adapter.decoder_linears(adapter.layers()[key[0]])[key[1]]

    @staticmethod
    def _install(adapter, key, left, core, right) -> None:
        """Replace linear `key` of the model by its FactorizedLinear (same device, dtype and bias)."""
        index, name = key
        layer = adapter.layers()[index]
        parent_path, _, leaf = name.rpartition(".")
        parent = layer.get_submodule(parent_path)
        old = getattr(parent, leaf)
        weight = old.weight
        new = FactorizedLinear(old.in_features, old.out_features, left.shape[-1], bias=old.bias is not None,
                               device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(core)
            new.block_out.copy_(left)
            new.block_in.copy_(right)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.requires_grad_(False)
        setattr(parent, leaf, new)


class Search:
    """One stack's descent with the reference code's early stopping (per matrix: no improvement of at least a
    relative 1e-6 and an absolute 1e-8 for `patience` iterations)."""

    def __init__(self, stack: FactorStack, keys: list, name: str):
        self.stack, self.keys, self.name = stack, keys, name
        self.start = stack.losses()
        self.best, self.waited, self.done = self.start.clone(), torch.zeros(len(keys), dtype=torch.long), 0

    @property
    def alive(self) -> bool:
        return bool(self.stack.active.any())

    def step(self, generator, greedy: bool, patience: int) -> torch.Tensor:
        loss = self.stack.iterate(generator, greedy=greedy)
        improved = (loss < self.best * (1 - 1e-6)) & (loss < self.best - 1e-8)
        self.best = torch.where(improved, loss, self.best)
        self.waited = torch.where(improved, torch.zeros_like(self.waited), self.waited + 1)
        self.stack.active &= self.waited < patience
        self.done += 1
        return loss

    def install(self, method: Armor, adapter) -> dict:
        """Put the current factors into the model; the stack's report entry."""
        left, core, right = self.stack.folded()
        for position, key in enumerate(self.keys):
            method._install(adapter, key, left[position], core[position], right[position])
        return {self.name: {"linears": len(self.keys), "block": self.stack.block, "iterations": self.done,
                            "stopped_early": int((~self.stack.active).sum()),
                            "proxy_loss_start": round(float(self.start.mean()), 6),
                            "proxy_loss_end": round(float(self.stack.losses().mean()), 6),
                            "factor_params": left.numel() + right.numel()}}
