"""STUN's expert stage: remove whole experts of a mixture-of-experts model (Lee et al., ACL 2025,
arXiv 2409.06211), with the baselines it is measured against as options of the same stage.

* Statistics: the router's choices on the calibration tokens, per MoE layer
  (`calibration.routing`): tokens per expert, co-activation, REAP saliency.
* `selection: stun` (default): experts that behave alike are clustered and each cluster keeps one
  expert. The distance of experts i, j is (1 - λ) x ||W_r[i] - W_r[j]|| / mean distance +
  λ x (1 - share of their tokens they share), λ = `coactivation` (W_r: router rows; the paper's
  Arctic run used router rows alone, λ = 0). Clusters are built by complete-linkage agglomeration
  (scipy; the released code's greedy merge with its all-pairs threshold test is an approximation of
  it). The kept expert of a cluster is the member closest to the cluster's weight centroid
  (`representative: centroid`, the released code) or the most routed-to one (`routed`);
  `merge: true` replaces the cluster by the routing-share-weighted mean of its members' weights
  and router rows instead.
* Baselines (`selection`): `frequency` keeps the most routed-to experts, `reap` those with the
  highest mean routing-weight x output norm (REAP), `random` a seeded random set.
* Budget: `experts_to_keep` (a count per layer, or a fraction) or `sparsity` (fraction removed).
  `budget: layer` removes the same number from every layer (stock config on export); `budget:
  global` spends one budget over all layers, cheapest removals first (STUN: the lowest merge
  heights; baselines: the lowest scores, normalised per layer), so layers differ (per-layer export).
* Inputs: `sequential` (default with `budget: layer`) measures each layer on the outputs of the
  already-pruned layers before it; `dense` (the only choice with `budget: global`, the paper's)
  measures every layer on the dense model in one pass.
* After it, the usual weight stage prunes inside the experts left (`recipes/stun_25.yaml`: Wanda with
  `sparsity_of: model`, so its sparsity counts the removed experts).

Example stage:

    - method: stun
      experts_to_keep: 0.75
      selection: stun
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

from calibration.routing import RoutingStats, routing_stats
from compress.arch.moe import keep_experts
from compress.config import StageConfig
from compress.errors import UserError
from compress.methods.base import Method, StageContext
from compress.methods.registry import register

DEFAULT_SPARSITY = 0.25


class StunConfig(StageConfig):
    method: Literal["stun"] = "stun"
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of the experts removed (default "
                                                                     f"{DEFAULT_SPARSITY}); or give experts_to_keep")
    experts_to_keep: int | float | None = Field(None, gt=0, description="experts kept: a count per layer (integer) "
                                                                        "or a fraction of the experts (0-1)")
    budget: Literal["layer", "global"] = Field("layer", description="the same count in every layer, or one budget "
                                                                    "over all layers")
    selection: Literal["stun", "frequency", "reap", "random"] = "stun"
    coactivation: float = Field(0.0, ge=0.0, le=1.0, description="STUN's lambda: weight of co-activation against "
                                                                 "router-row distance")
    representative: Literal["centroid", "routed", "reap"] = Field(
        "centroid", description="the expert a cluster keeps: closest to the weight centroid, most routed-to, or "
                                "the highest REAP saliency")
    merge: bool = Field(False, description="replace a cluster by the routing-share mean of its members instead")
    min_experts: int = Field(1, ge=1, description="experts always kept in every layer")
    inputs: Literal["sequential", "dense"] | None = Field(
        None, description="statistics after the earlier layers are pruned, or from the dense model (default: "
                          "sequential for budget=layer, dense for budget=global)")
    seed: int = Field(0, description="selection=random")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.sparsity is not None and self.experts_to_keep is not None:
            raise ValueError("give sparsity (experts removed) or experts_to_keep (experts kept), not both")
        if isinstance(self.experts_to_keep, float) and self.experts_to_keep > 1:
            raise ValueError(f"experts_to_keep={self.experts_to_keep}: a fraction is at most 1, a count an integer")
        if self.budget == "global" and self.inputs == "sequential":
            raise ValueError("budget=global decides after every layer is measured, so on the dense model: "
                             "set inputs=dense, or budget=layer")
        if self.merge and self.selection != "stun":
            raise ValueError(f"merge=true merges STUN's clusters; selection={self.selection} makes none")
        return self

    @property
    def sequential(self) -> bool:
        return (self.inputs or ("sequential" if self.budget == "layer" else "dense")) == "sequential"

    @property
    def kept_share(self) -> float | None:
        """The fraction of the experts kept, or None when `experts_to_keep` is a count."""
        keep = self.experts_to_keep
        if isinstance(keep, int):
            return None
        return keep if keep is not None else 1 - (DEFAULT_SPARSITY if self.sparsity is None else self.sparsity)

    def kept(self, experts: int, layers: int = 1) -> int:
        """Experts kept out of `experts` (the layer's; with budget=global all layers', `layers` of them)."""
        share = self.kept_share
        count = self.experts_to_keep * layers if share is None else round(share * experts)
        return max(self.min_experts * layers, min(experts, count))

    def summary(self) -> str:
        share = self.kept_share
        kept = f"{self.experts_to_keep} experts per layer" if share is None else f"{share:.0%} of the experts"
        return f"{self.selection} expert pruning, {kept} kept"

    def check_model(self, view, number: int, recipe) -> None:
        if not view.known:
            return
        if not view.is_moe:
            raise UserError(f"stage {number} (stun) removes experts of a mixture-of-experts model and this model has "
                            f"none; use flap or wanda_sp to remove channels and heads of a dense model")
        for key in ("experts_to_keep", "min_experts"):
            value = getattr(self, key)
            if isinstance(value, int) and value > view.experts:
                raise UserError(f"stages.{number}.{key}={value} is more than the model's {view.experts} experts "
                                f"per layer")


def expert_distance(router: torch.Tensor, stats: RoutingStats, coactivation: float) -> torch.Tensor:
    """STUN's behaviour distance [E, E] (0 on the diagonal, comparable across layers)."""
    rows = router.detach().double().cpu()
    count = rows.shape[0]
    off = ~torch.eye(count, dtype=torch.bool)
    distance = torch.cdist(rows, rows)
    distance = distance / distance[off].mean().clamp_min(1e-30)
    shared = stats.coactivation / torch.minimum(stats.counts[:, None], stats.counts[None, :]).clamp_min(1)
    distance = (1 - coactivation) * distance + coactivation * (1 - shared)
    distance = (distance + distance.T) / 2
    distance.fill_diagonal_(0)
    return distance


def merge_tree(distance: torch.Tensor):
    """Complete-linkage merges: (heights, pairs) in merge order; ids >= E are earlier merges (scipy's format)."""
    tree = linkage(squareform(distance.numpy(), checks=False), method="complete")
    return tree[:, 2].tolist(), [(int(a), int(b)) for a, b in tree[:, :2]]


def clusters_after(pairs, count: int, merges: int) -> list[list[int]]:
    """The clusters of `count` experts after the first `merges` merges of the tree."""
    members = {e: [e] for e in range(count)}
    for step, (a, b) in enumerate(pairs[:merges]):
        members[count + step] = members.pop(a) + members.pop(b)
    return sorted(sorted(group) for group in members.values())


@register
class Stun(Method):
    name = "stun"
    Config = StunConfig

    def run(self, ctx: StageContext) -> dict:
        adapter, cfg, folder = ctx.adapter, self.config, ctx.folder
        capture = ctx.new_capture(2 if cfg.sequential else 1)
        measured: dict[int, RoutingStats] = {}
        plan: dict[int, dict] = {}
        saved = folder.load_hidden() if folder is not None else None
        if saved is not None:  # resume: layers before `depth` were measured (and, if sequential, pruned)
            depth, hidden, _ = saved
            for index in range(depth):
                loaded = folder.load_layer(index)
                if loaded is not None:
                    measured[index] = RoutingStats.from_tensors(loaded[0])
                    if cfg.sequential:
                        with adapter.onloaded(index):
                            plan[index] = self.apply(adapter, index, adapter.layers()[index], measured[index], None)
            capture.resume(depth, hidden)
            ctx.log(f"resuming at layer {depth} from {folder.path}")
        for index, layer in capture.layers():
            if adapter.experts(layer) is None:  # a dense layer of a mixed model
                capture.forward(index, layer)
            else:
                with routing_stats(adapter, layer) as stats:
                    capture.forward(index, layer, advance=not cfg.sequential)
                measured[index] = stats
                if cfg.sequential:
                    plan[index] = self.apply(adapter, index, layer, stats, None)
                    capture.forward(index, layer, advance=True)
                if folder is not None:
                    folder.save_layer(index, stats.to_tensors())
            if folder is not None:
                folder.checkpoint_hidden(index + 1, capture.hidden)
        del capture
        if not cfg.sequential:
            counts = self.kept_counts(measured)
            for index, layer in enumerate(adapter.layers()):
                if index in measured:
                    with adapter.onloaded(index):
                        plan[index] = self.apply(adapter, index, layer, measured[index], counts[index])
        return self.details(measured, plan)

    def tree(self, stats: RoutingStats):
        """STUN's merge tree of a layer (computed once per statistics)."""
        if getattr(stats, "tree", None) is None:
            stats.tree = merge_tree(expert_distance(stats.router, stats, self.config.coactivation))
        return stats.tree

    def removal_keys(self, index: int, stats: RoutingStats) -> list[float]:
        """The cost of removing one more expert of the layer, step by step (non-decreasing)."""
        if self.config.selection == "stun":
            return self.tree(stats)[0]
        scores = self.scores(index, stats)
        return sorted((scores / scores.mean().clamp_min(1e-30)).tolist())

    def scores(self, index: int, stats: RoutingStats) -> torch.Tensor:
        """Baselines: each expert's importance (higher = kept first)."""
        cfg = self.config
        if cfg.selection == "frequency":
            return stats.counts / max(stats.tokens, 1)
        if cfg.selection == "reap":
            return stats.reap_mean()
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + index)
        return torch.rand(len(stats.counts), generator=generator, dtype=torch.float64)

    def kept_counts(self, measured: dict[int, RoutingStats]) -> dict[int, int]:
        cfg = self.config
        sizes = {index: len(stats.counts) for index, stats in measured.items()}
        if cfg.budget == "layer":
            return {index: cfg.kept(size) for index, size in sizes.items()}
        total = sum(sizes.values())
        target = cfg.kept(total, len(sizes))
        steps = sorted((key, index) for index in sizes
                       for key in self.removal_keys(index, measured[index])[:max(0, sizes[index] - cfg.min_experts)])
        counts = dict(sizes)
        for _key, index in steps[:max(0, total - target)]:
            counts[index] -= 1
        return counts

    def groups(self, index: int, stats: RoutingStats, count: int) -> list[list[int]]:
        """The layer's experts grouped: each group becomes one expert (clusters; singletons for baselines)."""
        experts = len(stats.counts)
        if count >= experts:
            return [[e] for e in range(experts)]
        if self.config.selection == "stun":
            return clusters_after(self.tree(stats)[1], experts, experts - count)
        order = torch.sort(self.scores(index, stats), descending=True, stable=True).indices[:count]
        return [[int(e)] for e in sorted(order.tolist())]

    def apply(self, adapter, index: int, layer, stats: RoutingStats, count: int | None) -> dict:
        """Cut the layer to one expert per group: {"clusters": groups, "kept": original index per group}."""
        cfg = self.config
        experts, router = adapter.experts(layer), adapter.router(layer)
        count = cfg.kept(len(stats.counts)) if count is None else count
        groups = self.groups(index, stats, count)
        if cfg.merge:  # routing-share means, summed in float32 whatever the model's dtype
            shares = [stats.counts[g] / stats.counts[g].sum() if stats.counts[g].sum() > 0
                      else torch.full((len(g),), 1 / len(g), dtype=torch.float64) for g in groups]
            with torch.no_grad():
                def mean(tensor):
                    return torch.stack([torch.einsum("e,e...->...", s.float().to(tensor.device), tensor[g].float())
                                        for g, s in zip(groups, shares)]).to(tensor.dtype)
                rows = mean(router.weight)
                keep_experts(adapter, layer, [g[0] for g in groups], mean(experts.gate_up_proj),
                             mean(experts.down_proj), rows)
            return {"clusters": groups, "kept": None}
        kept = [self.representative(experts, stats, g) for g in groups]
        keep_experts(adapter, layer, kept)
        return {"clusters": groups, "kept": kept}

    def representative(self, experts, stats: RoutingStats, group: list[int]) -> int:
        if len(group) == 1:
            return group[0]
        if self.config.representative == "routed":
            return group[int(torch.argmax(stats.counts[group]))]
        if self.config.representative == "reap":
            return group[int(torch.argmax(stats.reap_mean()[group]))]
        # ||w_m - centroid||^2 from the members' inner products (float32 products, float64 sums)
        gram = 0
        for tensor in (experts.gate_up_proj.detach(), experts.down_proj.detach()):
            flat = tensor[group].reshape(len(group), -1).float()
            gram = gram + (flat @ flat.T).double()
        distance = gram.diagonal() - 2 * gram.mean(1) + gram.mean()
        return group[int(torch.argmin(distance.cpu()))]

    def details(self, measured: dict[int, RoutingStats], plan: dict[int, dict]) -> dict:
        before = sum(len(s.counts) for s in measured.values())
        after = sum(len(entry["clusters"]) for entry in plan.values())
        details = {"experts_before": before, "experts_after": after, "experts_removed_fraction": 1 - after / before,
                   "layers": {str(i): plan[i] for i in sorted(plan)}}
        for index, stats in measured.items():  # what the router did on the calibration tokens
            plan[index]["routed_tokens"] = [int(c) for c in stats.counts]
        if not self.config.merge:
            # the share of the tokens' expert picks, and of the router's probability, on removed experts
            picks = sum(float(s.counts.sum() - s.counts[plan[i]["kept"]].sum()) for i, s in measured.items())
            details["routed_picks_removed"] = picks / sum(float(s.counts.sum()) for s in measured.values())
            mass = [float(1 - s.probability[plan[i]["kept"]].sum() / s.probability.sum()) for i, s in measured.items()]
            details["router_probability_removed_mean"] = sum(mass) / len(mass)
        return details
