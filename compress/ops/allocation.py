"""Turning unit scores into keep-decisions under a parameter budget (shared by structured methods).

A *unit* is a removable structure (one KV group, one MLP channel) with a score (higher = more
important) and a parameter cost. Budgets are always counted in real parameters, so GQA groups
and MLP channels are weighed by what removing them actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UnitScores:
    """Scores of all units of one kind in one layer."""

    layer: int
    kind: str  # "attention" or "mlp"
    scores: torch.Tensor  # [units], float
    unit_params: int
    removable: bool = True  # False: always kept, but counted in the budget (e.g. OLMoE attention)


def _keep_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    count = max(0, min(count, len(scores)))
    return torch.topk(scores.float(), count).indices.sort().values


def global_allocation(units: list[UnitScores], sparsity: float,
                      min_units: int = 1) -> dict[tuple[int, str], torch.Tensor]:
    """One global ranking: keep the best units until the kept parameters reach (1 - sparsity) of the total.

    The cut is placed where the kept parameter count is closest to the target. The `min_units`
    best units of every (layer, kind) are always kept so no layer loses a whole module.
    """
    scores = torch.cat([u.scores.float() for u in units])
    weights = torch.cat([torch.full((len(u.scores),), float(u.unit_params), dtype=torch.float64) for u in units])
    owner = torch.cat([torch.full((len(u.scores),), i, dtype=torch.long) for i, u in enumerate(units)])
    local = torch.cat([torch.arange(len(u.scores)) for u in units])
    forced = torch.zeros(len(scores), dtype=torch.bool)
    offset = 0
    for u in units:
        if not u.removable:
            forced[offset:offset + len(u.scores)] = True
        elif min_units > 0:
            forced[offset + _keep_top(u.scores, min_units)] = True
        offset += len(u.scores)
    rank_key = torch.where(forced, torch.full_like(scores, float("inf")), scores)
    order = torch.argsort(rank_key, descending=True, stable=True)
    # kept_params[n] = parameters of the n best units; forced units come first in the order.
    kept_params = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(weights[order], 0)])
    target = (1.0 - sparsity) * float(weights.sum())
    n_forced = int(forced.sum())
    n_keep = n_forced + int(torch.argmin((kept_params[n_forced:] - target).abs()))
    kept_mask = torch.zeros(len(scores), dtype=torch.bool)
    kept_mask[order[:n_keep]] = True
    result = {}
    for i, u in enumerate(units):
        result[(u.layer, u.kind)] = local[(owner == i) & kept_mask].sort().values
    return result


def uniform_allocation(units: list[UnitScores], sparsity: float,
                       min_units: int = 1) -> dict[tuple[int, str], torch.Tensor]:
    """The same decision in every layer: each layer loses `sparsity` of its own attention+MLP parameters.

    Attention loses round(sparsity x groups) KV groups; the MLP loses enough channels to bring the
    layer to the target. Within a layer, the lowest-scored units go.
    """
    by_layer: dict[int, dict[str, UnitScores]] = {}
    for u in units:
        by_layer.setdefault(u.layer, {})[u.kind] = u
    result = {}
    for layer, kinds in by_layer.items():
        attn, mlp = kinds.get("attention"), kinds.get("mlp")
        layer_params = sum(len(u.scores) * u.unit_params for u in kinds.values())
        removed_attention = 0
        if attn is not None:
            groups = len(attn.scores)
            removed_attention = min(int(round(sparsity * groups)), groups - min_units) if attn.removable else 0
            result[(layer, "attention")] = _keep_top(attn.scores, groups - removed_attention)
        if mlp is not None:
            budget = sparsity * layer_params - removed_attention * (attn.unit_params if attn else 0)
            channels = len(mlp.scores)
            removed = min(max(int(round(budget / mlp.unit_params)), 0), channels - min_units)
            result[(layer, "mlp")] = _keep_top(mlp.scores, channels - removed)
    return result


def same_width_allocation(units: list[UnitScores], kept: dict[tuple[int, str], torch.Tensor],
                          sparsity: float, min_units: int = 1) -> dict[tuple[int, str], torch.Tensor]:
    """Round a per-layer decision to one width per kind (so the stock config still describes the model).

    Attention keeps the mean number of groups (rounded); the MLP width is then set so the total kept
    parameters stay closest to the target. Within each layer the best-scored units are kept.
    """
    attention = [u for u in units if u.kind == "attention"]
    mlp = [u for u in units if u.kind == "mlp"]
    total = sum(len(u.scores) * u.unit_params for u in units)
    target = (1.0 - sparsity) * total
    result = {}
    kept_attention_params = 0.0
    if attention:
        mean_groups = sum(len(kept[(u.layer, u.kind)]) for u in attention) / len(attention)
        groups = max(min_units, int(round(mean_groups)))
        for u in attention:
            count = groups if u.removable else len(u.scores)
            result[(u.layer, u.kind)] = _keep_top(u.scores, count)
            kept_attention_params += count * u.unit_params
    if mlp:
        per_layer_params = sum(u.unit_params for u in mlp)
        channels = int(round((target - kept_attention_params) / per_layer_params))
        channels = max(min_units, min(channels, min(len(u.scores) for u in mlp)))
        for u in mlp:
            result[(u.layer, u.kind)] = _keep_top(u.scores, channels)
    return result


def round_widths(units: list[UnitScores], kept: dict[tuple[int, str], torch.Tensor], multiple: int,
                 kinds: tuple[str, ...] = ("mlp",)) -> dict[tuple[int, str], torch.Tensor]:
    """Round each pruned width of `kinds` to the nearest multiple of `multiple` (at least one multiple).

    Unpruned modules keep their width. Within a layer the best-scored units are kept, so rounding
    up restores the best of the removed units and rounding down drops the worst of the kept ones.
    """
    if multiple <= 1:
        return kept
    result = dict(kept)
    for u in units:
        key = (u.layer, u.kind)
        total = len(u.scores)
        if u.kind not in kinds or key not in kept or len(kept[key]) == total:
            continue
        width = max(multiple, int(round(len(kept[key]) / multiple)) * multiple)
        result[key] = _keep_top(u.scores, min(width, total))
    return result


def standardize(values: torch.Tensor) -> torch.Tensor:
    std = values.std()
    return (values - values.mean()) / (std if std > 0 else 1.0)


def importance_weights(distance: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid(temperature * (d - mean d)): > 0.5 for layers that change the stream more than average."""
    distance = distance.double()
    return torch.sigmoid(temperature * (distance - distance.mean()))


def block_keep_ratios(weights: torch.Tensor, sizes: torch.Tensor, keep: float, floor: float,
                      ceiling: float = 1.0) -> torch.Tensor:
    """Keep ratio per layer proportional to `weights`, size-weighted mean `keep`, within [floor, ceiling].

    Out-of-range ratios are brought in by shrinking every deviation about the mean by one factor,
    which keeps the mean (and so the global budget) exact.
    """
    weights, sizes = weights.double(), sizes.double()
    ratios = keep * weights * sizes.sum() / (weights * sizes).sum()
    gamma = 1.0
    if ratios.max() > ceiling:
        gamma = min(gamma, (ceiling - keep) / float(ratios.max() - keep))
    if ratios.min() < floor:
        gamma = min(gamma, (keep - floor) / float(keep - ratios.min()))
    return keep + gamma * (ratios - keep)
