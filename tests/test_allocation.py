"""Budget allocation counts real parameters and never empties a module."""

import pytest
import torch

from compress.ops.allocation import UnitScores, global_allocation, same_width_allocation, uniform_allocation


def _units(layers=4, groups=3, channels=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    units = []
    for layer in range(layers):
        units.append(UnitScores(layer, "attention", torch.randn(groups, generator=g), 5000))
        units.append(UnitScores(layer, "mlp", torch.randn(channels, generator=g), 30))
    return units


def _kept_fraction(units, keep):
    total = sum(len(u.scores) * u.unit_params for u in units)
    kept = sum(len(keep[(u.layer, u.kind)]) * u.unit_params for u in units)
    return kept / total


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.2, 0.5, 0.7])
def test_global_allocation_hits_target_within_half_a_point(sparsity):
    # SmolLM2's proportions: a KV group costs 512/3 MLP channels, 30 layers.
    units = _units(layers=30, groups=3, channels=1536)
    for u in units:
        u.unit_params = 5120 if u.kind == "attention" else 30
    keep = global_allocation(units, sparsity)
    assert abs((1 - _kept_fraction(units, keep)) - sparsity) <= 0.005


def test_global_allocation_keeps_the_best_units():
    units = [UnitScores(0, "mlp", torch.tensor([0.1, 5.0, 3.0, -1.0]), 1)]
    keep = global_allocation(units, 0.5, min_units=0)
    assert keep[(0, "mlp")].tolist() == [1, 2]


def test_global_allocation_never_empties_a_module():
    units = [UnitScores(0, "attention", torch.tensor([-9.0, -8.0]), 100),
             UnitScores(0, "mlp", torch.tensor([5.0, 4.0, 3.0]), 1)]
    keep = global_allocation(units, 0.9, min_units=1)
    assert len(keep[(0, "attention")]) == 1


def test_uniform_allocation_gives_each_layer_the_target():
    units = _units()
    keep = uniform_allocation(units, 0.3)
    for layer in range(4):
        layer_units = [u for u in units if u.layer == layer]
        assert abs((1 - _kept_fraction(layer_units, keep)) - 0.3) < 0.01


def test_same_width_allocation_gives_one_width_per_kind():
    units = _units()
    keep = same_width_allocation(units, global_allocation(units, 0.4), 0.4)
    assert len({len(keep[(layer, "mlp")]) for layer in range(4)}) == 1
    assert len({len(keep[(layer, "attention")]) for layer in range(4)}) == 1
    assert abs((1 - _kept_fraction(units, keep)) - 0.4) < 0.02


def test_round_widths_gives_multiples_and_keeps_the_best():
    from compress.ops.allocation import round_widths
    units = _units(channels=200)
    keep = global_allocation(units, 0.3)
    rounded = round_widths(units, keep, 8)
    for u in units:
        width = len(rounded[(u.layer, u.kind)])
        if u.kind == "mlp":
            assert width % 8 == 0 or width == 200
            assert abs(width - len(keep[(u.layer, u.kind)])) <= 4
            best = torch.topk(u.scores, width).indices.sort().values
            assert torch.equal(rounded[(u.layer, u.kind)], best)
        else:  # attention groups are not rounded
            assert torch.equal(rounded[(u.layer, u.kind)], keep[(u.layer, u.kind)])
    assert round_widths(units, keep, 1) is keep


@pytest.mark.parametrize("allocation", [global_allocation, uniform_allocation, "same_width"])
def test_units_that_cannot_be_removed_are_kept_and_the_rest_carries_the_budget(allocation):
    units = _units(layers=6, groups=3, channels=400)
    for u in units:
        if u.kind == "attention":
            u.removable = False
            u.scores = torch.full_like(u.scores, -10.0)  # the worst units of all, still kept
    if allocation == "same_width":
        keep = same_width_allocation(units, global_allocation(units, 0.3), 0.3)
    else:
        keep = allocation(units, 0.3)
    assert all(len(keep[(u.layer, "attention")]) == 3 for u in units)
    assert _kept_fraction(units, keep) == pytest.approx(0.7, abs=0.01)
