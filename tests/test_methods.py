"""FLAP and Wanda-sp on a tiny GQA model: identity at 0, targets met, GQA kept consistent."""

import pytest
import torch

from calibration.capture import LayerwiseCapture
from compress.arch import get_adapter
from compress.methods import METHODS
from compress.methods.base import StageContext
from compress.ops.slicing import decoder_linear_params
from tests.conftest import TINY_ARCHITECTURES, TINY_MOE_ARCHITECTURES, tiny_llama, tiny_model

WINDOWS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


def prune(model, method: str, windows=WINDOWS, **config):
    adapter = get_adapter(model)
    cls = METHODS[method]
    stage = cls(cls.Config(method=method, **config))
    stage.run(StageContext(adapter, lambda passes: LayerwiseCapture(adapter, windows, 8)))
    return adapter


def logits(model, ids=WINDOWS[:2]):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["flap", "wanda_sp"])
def test_sparsity_zero_is_the_identity(method):
    model, reference = tiny_llama(), tiny_llama()
    prune(model, method, sparsity=0.0)
    torch.testing.assert_close(logits(model), logits(reference))


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES + TINY_MOE_ARCHITECTURES)
@pytest.mark.parametrize("method", ["flap", "wanda", "sparsegpt"])
def test_sparsity_zero_is_the_identity_on_every_architecture(method, model_type):
    """Audit R3: a structured and a weight-level method at sparsity 0 change nothing, dense and MoE."""
    from compress.arch.moe import model_experts, routed_experts

    model, reference = tiny_model(model_type), tiny_model(model_type)
    adapter = prune(model, method, sparsity=0.0)
    with routed_experts(model_experts(adapter)):
        torch.testing.assert_close(logits(model), logits(reference))


@pytest.mark.parametrize("method,config", [
    ("flap", {}), ("flap", {"structure": "UL-UM"}), ("flap", {"metric": "IFV"}), ("flap", {"metric": "WIFN"}),
    ("flap", {"uniform": True}), ("wanda_sp", {}),
])
@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_achieved_sparsity_close_to_target(method, config, sparsity):
    model = tiny_llama(num_hidden_layers=4, intermediate_size=320)
    adapter = get_adapter(model)
    before = decoder_linear_params(adapter)
    prune(model, method, sparsity=sparsity, **config)
    achieved = 1 - decoder_linear_params(adapter) / before
    # Tiny model: one KV group is 4% of a layer, so allow the granularity of one group.
    assert abs(achieved - sparsity) < 0.04
    for layer in adapter.layers():
        shape = adapter.attention_shape(layer)
        assert shape.num_kv_heads >= 1 and shape.num_heads == shape.num_kv_heads * 3
        assert adapter.intermediate_size(layer) >= 1
    assert torch.isfinite(logits(model)).all()


def test_uniform_gives_the_same_width_in_every_layer():
    model = tiny_llama(num_hidden_layers=4, intermediate_size=320)
    adapter = prune(model, "flap", sparsity=0.4, uniform=True)
    widths = {tuple(adapter.layer_widths(layer).values()) for layer in adapter.layers()}
    assert len(widths) == 1


def test_flap_compensation_adds_output_biases_and_each_step_helps():
    # Measured on the calibration windows: what compensation fits is what it must improve.
    windows = torch.randint(0, 320, (48, 32), generator=torch.Generator().manual_seed(5))
    reference = logits(tiny_llama(), windows)
    errors = {}
    for mode in ("none", "bias", "least_squares"):
        model = tiny_llama()
        adapter = prune(model, "flap", windows, sparsity=0.4, compensation=mode, covariance_token_stride=1)
        has_bias = any(adapter.down_proj(layer).bias is not None for layer in adapter.layers())
        assert has_bias == (mode != "none")
        errors[mode] = float((logits(model, windows) - reference).pow(2).mean())
    assert errors["least_squares"] < errors["bias"] < errors["none"]


def test_flap_removes_low_fluctuation_channels():
    """Audit D3: checked on the kept index set (gate rows are never rewritten by the compensation), so
    a FLAP that kept its worst channels fails this test."""
    model = tiny_llama(num_hidden_layers=1)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    down = adapter.down_proj(layer)
    with torch.no_grad():  # channel 7 carries no signal: its column of down_proj is tiny
        down.weight[:, 7] *= 1e-6
    gate_before = adapter.gate_up(layer)[0].weight.detach().clone()
    prune(model, "flap", sparsity=0.2, structure="UL-UM")
    gate_after = adapter.gate_up(adapter.layers()[0])[0].weight.detach()
    kept = [int((gate_before - row).abs().sum(1).argmin()) for row in gate_after]
    assert torch.equal(gate_after, gate_before[kept])  # rows are kept as they were, in order
    assert 7 not in kept and len(kept) < gate_before.shape[0]
