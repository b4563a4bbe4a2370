"""What a mixture-of-experts layer's router does on the calibration tokens.

`routing_stats(adapter, layer)` hooks the layer's router and its experts' down projections (the
per-expert views of `compress.arch.moe`, which see exactly the routed tokens while the capture runs
a layer) and accumulates, in float64:

- `counts[e]`: tokens that picked expert e among their top-k;
- `coactivation[i, j]`: tokens that picked both i and j (the diagonal is `counts`);
- `probability[e]`: the router's softmax mass on e, summed over all tokens;
- `reap[e]`: sum over e's tokens of routing weight x ||expert output|| (REAP's saliency, Lasby et
  al. 2025, before the mean over those tokens);
- `router`: the router rows as they were (float64, CPU), so decisions need no weight of the layer
  later (a layer offloaded to disk is back on disk by then).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from compress.arch.moe import expert_linears


@dataclass
class RoutingStats:
    counts: torch.Tensor
    coactivation: torch.Tensor
    probability: torch.Tensor
    reap: torch.Tensor
    router: torch.Tensor
    tokens: int = 0

    @classmethod
    def empty(cls, router: torch.Tensor) -> "RoutingStats":
        experts = router.shape[0]
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(zeros(experts), zeros(experts, experts), zeros(experts), zeros(experts),
                   router.detach().double().cpu())

    def reap_mean(self) -> torch.Tensor:
        """REAP saliency: the mean over each expert's routed tokens (0 for an expert never routed to)."""
        return self.reap / self.counts.clamp_min(1)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "coactivation": self.coactivation, "probability": self.probability,
                "reap": self.reap, "router": self.router, "tokens": torch.tensor([self.tokens], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "RoutingStats":
        return cls(tensors["counts"], tensors["coactivation"], tensors["probability"], tensors["reap"],
                   tensors["router"], int(tensors["tokens"].item()))


@contextmanager
def routing_stats(adapter, layer: nn.Module):
    """Yields the `RoutingStats` of `layer`'s router, filled while the layer runs inside the block."""
    router = adapter.router(layer)
    views = expert_linears(adapter.experts(layer))
    stats = RoutingStats.empty(router.weight)

    def on_router(_module, _args, output):
        logits, _weights, indices = output[:3]
        picked = torch.zeros(indices.shape[0], len(views), dtype=torch.float64, device=indices.device)
        picked.scatter_(1, indices, 1.0)
        stats.counts += picked.sum(0).cpu()
        stats.coactivation += (picked.T @ picked).cpu()
        stats.probability += torch.softmax(logits.detach().double(), dim=-1).sum(0).cpu()
        stats.tokens += indices.shape[0]

    def on_expert(expert: int):
        def hook(module, _args, output):  # the routed loop hands the view its tokens' routing weights
            weight = module.routing_weights.detach().double().flatten()
            stats.reap[expert] += (weight * output.detach().double().norm(dim=-1)).sum().cpu()
        return hook

    handles = [router.register_forward_hook(on_router)]
    handles += [down.register_forward_hook(on_expert(e)) for e, (_, _, down) in enumerate(views)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
