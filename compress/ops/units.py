"""Kinds of allocation units: what one unit of a structured decision removes.

A kind is stored and reported as its string, so work folders and reports keep their format:

- `attention`: one KV group (its query heads, k/v head and o_proj columns);
- `mlp`: one MLP channel (gate/up rows and the down_proj column);
- `mlp.<e>`: the channels of expert e of a mixture-of-experts layer (statistics of its down_proj
  input; the layer keeps one width, each expert its own channels);
- `expert`: one whole expert (cost = the expert's parameters), for methods that remove experts.
"""

from __future__ import annotations

ATTENTION = "attention"
MLP = "mlp"
EXPERT = "expert"
KINDS = (ATTENTION, MLP, EXPERT)


def expert_channels(expert: int) -> str:
    """The kind of expert `expert`'s channels: 'mlp.<e>'."""
    return f"{MLP}.{expert}"


def expert_of(kind: str) -> int | None:
    """Expert index of an 'mlp.<e>' kind, None for any other kind."""
    prefix = f"{MLP}."
    return int(kind[len(prefix):]) if kind.startswith(prefix) else None


def is_expert_kind(kind: str) -> bool:
    """'mlp.<e>' kinds belong to one expert's down projection (which cannot carry a bias)."""
    return expert_of(kind) is not None
