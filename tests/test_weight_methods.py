"""Wanda and magnitude on a tiny model: exact zero counts, exact N:M, identity at 0, reload keeps the pattern."""

import pytest
import torch

import compress
from calibration.capture import LayerwiseCapture
from compress.arch import get_adapter
from compress.masks import follows_nm, zero_fraction
from compress.methods import METHODS
from compress.methods.base import StageContext
from tests.conftest import tiny_llama

WINDOWS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


def prune(model, method, **config):
    adapter = get_adapter(model)
    cls = METHODS[method]
    return cls(cls.Config(method=method, **config)).run(StageContext(adapter, lambda passes: LayerwiseCapture(adapter, WINDOWS, 4)))


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_sparsity_zero_is_the_identity(method):
    model, reference = tiny_llama(), tiny_llama()
    prune(model, method, sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(WINDOWS[:2]).logits, reference(WINDOWS[:2]).logits)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_unstructured_half_zeroes_half_of_every_linear(method):
    model = tiny_llama()
    details = prune(model, method, sparsity=0.5)
    for layer in get_adapter(model).layers():
        for linear in get_adapter(model).decoder_linears(layer).values():
            assert zero_fraction(linear.weight) == pytest.approx(0.5, abs=0.01)
    assert len(details["zero_fraction_per_linear"]) == 3 * 7


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns_are_exact(method, pattern):
    model = tiny_llama()
    prune(model, method, sparsity=0.5, pattern=pattern)
    n, m = map(int, pattern.split(":"))
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            assert follows_nm(linear.weight, n, m)


def test_wanda_prunes_weights_of_silent_inputs_first():
    model = tiny_llama(num_hidden_layers=1)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    with torch.no_grad():  # MLP channel 5 never fires: its down_proj input is always 0
        adapter.gate_up(layer)[1].weight[5] = 0
    prune(model, "wanda", sparsity=0.25)
    assert (adapter.down_proj(layer).weight[:, 5] == 0).all()


def test_wanda_2_4_checkpoint_reloads_with_the_pattern(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}]
    report = compress.run(tiny_recipe, progress=False, log=lambda _: None)
    assert report["stages"][0]["pattern"] == "2:4"
    model = compress.load(tmp_path / "out")
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            assert follows_nm(linear.weight, 2, 4)
