"""Evolutionary search of per-layer removal counts under a fixed parameter budget (Týr-the-Pruner's
search, after EvoPress).

A configuration gives every key (layer, kind) a number of units removed. A `Grid` lists the counts
each key may take in one round of the search: the round's centre plus or minus up to `half` steps,
never below 0 or above what the layer may lose. Keys whose step removes the same number of
parameters form an exchange group; a mutation moves one step of removal from one key of a group to
another, so the parameters removed stay exactly the same (Týr never trades attention for MLP).

One generation (`evolve`): `offspring` mutants of the parent (each 1 to 4 moves, fewer more likely,
none seen before), scored on the first selection stage's fitness, the best `survivors[0]` rescored
on the next stage, and so on; the parent competes in the last stage (elitism) and the best there is
the next parent. Deterministic for a seed: `random.Random` drives every choice.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

Key = tuple[int, str]


def key_name(key: Key) -> str:
    """'layer:kind', as work folders store a configuration."""
    return f"{key[0]}:{key[1]}"


def parse_key(name: str) -> Key:
    layer, kind = name.split(":")
    return int(layer), kind


@dataclass
class Grid:
    levels: dict[Key, list[int]]  # allowed removal counts per key, ascending, spaced by `steps[key]`
    steps: dict[Key, int]
    unit_params: dict[Key, int]
    groups: list[list[Key]] = field(default_factory=list)

    @classmethod
    def around(cls, centre: dict[Key, int], steps: dict[Key, int], limits: dict[Key, int],
               unit_params: dict[Key, int], half: int = 4) -> "Grid":
        levels = {key: [centre[key] + j * steps[key] for j in range(-half, half + 1)
                        if 0 <= centre[key] + j * steps[key] <= limits[key]] for key in centre}
        by_cost: dict[tuple[str, int], list[Key]] = {}
        for key in sorted(centre):
            if steps[key] > 0 and len(levels[key]) > 1:
                by_cost.setdefault((key[1], steps[key] * unit_params[key]), []).append(key)
        groups = [keys for keys in by_cost.values() if len(keys) > 1]
        return cls(levels, steps, unit_params, groups)

    def params(self, config: dict[Key, int], kind: str | None = None) -> int:
        """Parameters removed by `config` (of one kind, or all)."""
        return sum(count * self.unit_params[key] for key, count in config.items() if kind in (None, key[1]))


def spread_evenly(blocks: int, keys: list[Key], limits: dict[Key, int], granule: int = 1) -> dict[Key, int]:
    """`blocks` x `granule` units removed over `keys` as evenly as their limits allow (the remainder on
    evenly spaced keys): the search's starting point."""
    counts = {key: 0 for key in keys}
    while blocks > 0:
        open_keys = [key for key in keys if counts[key] + granule <= limits[key]]
        if not open_keys:
            raise ValueError("removes more than the layers can lose")
        n, given = len(open_keys), 0
        for position, key in enumerate(open_keys):
            add = min(blocks * (position + 1) // n - blocks * position // n, (limits[key] - counts[key]) // granule)
            counts[key] += add * granule
            given += add
        blocks -= given
    return counts


def spread_budget(target: float, units: dict[Key, int], params: dict[Key, int], limits: dict[Key, int],
                  granules: dict[str, int]) -> dict[Key, int]:
    """Removal counts that remove `target` parameters: every kind the same share of its parameters
    (Týr's split), except that a kind which cannot lose that much (`limits`: e.g. a single KV group)
    loses what it can and the others share the rest; within a kind, `spread_evenly`."""
    size = {kind: sum(units[k] * params[k] for k in units if k[1] == kind) for kind in granules}
    capacity = {kind: sum(limits[k] * params[k] for k in units if k[1] == kind) for kind in granules}
    wanted, free, remaining = {}, [kind for kind in granules if capacity[kind] > 0], target
    while free:
        share = remaining / sum(size[kind] for kind in free)
        over = [kind for kind in free if share * size[kind] > capacity[kind]]
        if not over:
            wanted.update({kind: share * size[kind] for kind in free})
            break
        for kind in over:
            wanted[kind], remaining = capacity[kind], remaining - capacity[kind]
            free.remove(kind)
    if not free and remaining > 1e-9 * max(target, 1):
        raise ValueError("removes more than the layers can lose")
    centre = {key: 0 for key in units}
    for kind, removed in wanted.items():
        keys = [key for key in units if key[1] == kind]
        per_unit = size[kind] / sum(units[key] for key in keys)
        centre.update(spread_evenly(round(removed / per_unit / granules[kind]), keys, limits, granules[kind]))
    return centre


def mutate(parent: dict[Key, int], grid: Grid, rng: random.Random) -> dict[Key, int]:
    """A copy of `parent` with min(U(1,4), U(1,4)) budget-neutral moves (one step less removal on one
    key, one step more on another of the same exchange group)."""
    child = dict(parent)
    if not grid.groups:
        return child
    for _ in range(min(rng.randint(1, 4), rng.randint(1, 4))):
        keys = grid.groups[rng.randrange(len(grid.groups))]
        lower = [k for k in keys if child[k] - grid.steps[k] in grid.levels[k]]
        raise_ = [k for k in keys if child[k] + grid.steps[k] in grid.levels[k]]
        pairs = [(a, b) for a in lower for b in raise_ if a != b]
        if not pairs:
            continue
        a, b = pairs[rng.randrange(len(pairs))]
        child[a] -= grid.steps[a]
        child[b] += grid.steps[b]
    return child


@dataclass
class SearchState:
    parent: dict[Key, int]
    fitness: float  # of the parent on the last selection stage
    generation: int = 0
    history: list[float] = field(default_factory=list)  # best fitness after each generation
    evaluations: int = 0
    seen: set = field(default_factory=set)


def evolve(state: SearchState, grid: Grid, rng: random.Random, fitness: Callable[[dict, int], float],
           offspring: int, survivors: list[int], attempts: int = 50) -> SearchState:
    """One generation; `fitness(config, stage)` scores a configuration on selection stage `stage`
    (0 .. len(survivors)), lower is better. The parent's score is that of the last stage."""
    state.seen.add(_frozen(state.parent))
    children = []
    for _ in range(offspring):
        for _ in range(attempts):
            child = mutate(state.parent, grid, rng)
            if _frozen(child) not in state.seen:
                state.seen.add(_frozen(child))
                children.append(child)
                break
    scored = [(fitness(child, 0), child) for child in children]
    state.evaluations += len(children)
    for stage, keep in enumerate(survivors, start=1):
        scored = sorted(scored, key=lambda pair: pair[0])[:keep]
        scored = [(fitness(child, stage), child) for _, child in scored]
        state.evaluations += len(scored)
    best_score, best = min(scored, key=lambda pair: pair[0], default=(float("inf"), None))
    if best is not None and best_score < state.fitness:
        state.parent, state.fitness = best, best_score
    state.generation += 1
    state.history.append(state.fitness)
    return state


def _frozen(config: dict[Key, int]) -> tuple:
    return tuple(sorted(config.items()))
