"""CFSP: angular distance, layer budgets, the paper's fine score, and pruning a tiny model."""

import pytest
import torch
from torch import nn

from calibration.capture import LayerwiseCapture
from calibration.stats import angular_distance
from compress.arch import get_adapter
from compress.methods import METHODS
from compress.methods.base import StageContext
from compress.methods.cfsp import relative_share
from compress.ops.allocation import block_keep_ratios, importance_weights
from compress.ops.slicing import decoder_linear_params
from tests.conftest import tiny_llama

WINDOWS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


class Turn(nn.Module):
    """Maps every vector to a fixed rotation of itself (angle known exactly)."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix

    def forward(self, hidden):
        return hidden @ self.matrix.T


@pytest.mark.parametrize("matrix, expected", [
    (torch.eye(2), 0.0),             # identity: no turn
    (-torch.eye(2), 1.0),            # reversal: pi
    (torch.tensor([[0.0, -1.0], [1.0, 0.0]]), 0.5),  # quarter turn
])
def test_angular_distance_is_the_mean_angle_over_pi(matrix, expected):
    layer = Turn(matrix)
    with angular_distance(layer) as block:
        layer(torch.randn(3, 5, 2))
    assert block["angular_distance"] == pytest.approx(expected, abs=1e-3)


def test_keep_ratios_meet_the_budget_stay_in_range_and_follow_importance():
    distance = torch.tensor([0.05, 0.30, 0.10, 0.90, 0.20])
    sizes = torch.tensor([10.0, 10.0, 20.0, 10.0, 10.0])
    for keep in (0.3, 0.5, 0.8, 0.95):
        ratios = block_keep_ratios(importance_weights(distance, 6.5), sizes, keep, floor=0.05)
        assert float((ratios * sizes).sum() / sizes.sum()) == pytest.approx(keep, abs=1e-9)
        assert float(ratios.max()) <= 1.0 + 1e-12 and float(ratios.min()) >= 0.05 - 1e-12
        assert torch.equal(torch.argsort(ratios), torch.argsort(distance))
    # a steep temperature pushes the most important layer to the ceiling, not past it
    steep = block_keep_ratios(importance_weights(distance, 200.0), sizes, 0.9, floor=0.05)
    assert float(steep.max()) == pytest.approx(1.0)


def test_released_score_collapses_to_the_activation_norm_but_the_paper_score_does_not():
    torch.manual_seed(0)
    down, up, gate = torch.randn(12, 40), torch.randn(40, 12), torch.randn(40, 12)
    activation = torch.rand(40) + 0.1
    # the released code: each column normalised by its own sum, then averaged along that column
    column = lambda w: (w.abs() / w.abs().sum(0, keepdim=True)).mean(0)  # noqa: E731
    released = (column(down * activation) + column(up.T) + column(gate.T)) * activation
    assert torch.equal(torch.argsort(released), torch.argsort(activation))
    paper = relative_share(down, 1, activation) + relative_share(up, 0) + relative_share(gate, 0)
    assert not torch.equal(torch.argsort(paper), torch.argsort(activation))
    # each term gives every row (or input) a total share of one
    assert float(relative_share(down, 1, activation).sum()) == pytest.approx(12, rel=1e-5)
    assert float(relative_share(up, 0).sum()) == pytest.approx(12, rel=1e-5)


def prune(model, **config):
    adapter = get_adapter(model)
    ctx = StageContext(adapter, lambda passes: LayerwiseCapture(adapter, WINDOWS, 4), log=lambda _: None,
                       windows=WINDOWS)
    cls = METHODS["cfsp"]
    return cls(cls.Config(method="cfsp", **config)).run(ctx)


@pytest.mark.parametrize("targets", ["mlp", "both"])
def test_cfsp_meets_the_target_and_gives_important_layers_more(targets):
    model = tiny_llama()
    adapter = get_adapter(model)
    before = decoder_linear_params(adapter)
    heads = [adapter.attention_shape(layer).num_heads for layer in adapter.layers()]
    details = prune(model, sparsity=0.3, targets=targets)
    achieved = 1 - decoder_linear_params(adapter) / before
    assert achieved == pytest.approx(0.3, abs=0.02)
    if targets == "mlp":
        assert [adapter.attention_shape(layer).num_heads for layer in adapter.layers()] == heads
        widths = [adapter.intermediate_size(layer) for layer in adapter.layers()]
        order = sorted(range(3), key=lambda i: details["block_importance"][i])
        assert [widths[i] for i in order] == sorted(widths)
    assert len(details["block_keep_ratio"]) == 3


def test_cfsp_logits_stay_close_at_low_sparsity():
    model, reference = tiny_llama(), tiny_llama()
    prune(model, sparsity=0.05)
    with torch.no_grad():
        pruned, dense = model(WINDOWS[:2]).logits, reference(WINDOWS[:2]).logits
    assert float((pruned - dense).abs().mean()) < 0.1 * float(dense.abs().mean())
