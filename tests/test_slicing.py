"""Physical slicing equals masking, GQA groups stay consistent, bias compensation is exact on means."""

import pytest
import torch

from compress.arch import get_adapter
from compress.ops.slicing import (
    attention_unit_params,
    compensation_bias,
    decoder_linear_params,
    group_channels,
    mlp_unit_params,
    slice_attention,
    slice_mlp,
)
from tests.conftest import TINY_ARCHITECTURES, TINY_MOE_ARCHITECTURES, tiny_llama, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_group_channels_follow_transformers_head_layout():
    from compress.arch.base import AttentionShape

    q, kv = group_channels(AttentionShape(num_heads=6, num_kv_heads=2, head_dim=4), torch.tensor([1]))
    assert q.tolist() == list(range(12, 24))  # query heads 3, 4, 5
    assert kv.tolist() == list(range(4, 8))   # key/value head 1


def test_bias_compensation_is_exact_for_constant_removed_inputs():
    linear = torch.nn.Linear(8, 5, bias=False)
    x = torch.randn(100, 8)
    x[:, 5:] = torch.tensor([0.5, -1.0, 2.0])  # the removed channels never fluctuate
    kept = torch.arange(5)
    shift = compensation_bias(linear, x.mean(0), kept)
    with torch.no_grad():
        expected = linear(x)
        approx = x[:, :5] @ linear.weight[:, :5].T + shift
    torch.testing.assert_close(approx, expected)


def test_unit_parameter_counts_match_actual_removal():
    model = tiny_llama()
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    before = decoder_linear_params(adapter)
    attention_unit, mlp_unit = attention_unit_params(adapter, layer), mlp_unit_params(adapter, layer)
    slice_attention(adapter, layer, torch.tensor([0]))
    slice_mlp(adapter, layer, torch.arange(150))
    assert before - decoder_linear_params(adapter) == attention_unit + 10 * mlp_unit


def test_least_squares_compensation_recovers_linearly_dependent_inputs():
    from compress.ops.slicing import LeastSquaresCompensation

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4, bias=False)
    base = torch.randn(500, 4)
    x = torch.cat([base, base[:, :2] @ torch.tensor([[1.0, -2.0], [0.5, 3.0]]) + 0.7], dim=1)  # x4, x5 from x0, x1
    compensation = LeastSquaresCompensation(x.double().mean(0), torch.cov(x.double().T, correction=0), damping=1e-9)
    new = compensation.columns(linear, torch.arange(4))
    with torch.no_grad():
        torch.testing.assert_close(new(x[:, :4]), linear(x), atol=1e-4, rtol=1e-4)


def test_least_squares_never_worse_than_mean_on_the_calibration_data():
    from compress.ops.slicing import LeastSquaresCompensation, MeanCompensation

    torch.manual_seed(1)
    linear = torch.nn.Linear(12, 5, bias=False)
    x = torch.randn(2000, 12) @ torch.randn(12, 12) + torch.randn(12)  # correlated channels
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    errors = {}
    for name, compensation in {
        "mean": MeanCompensation(x.mean(0)),
        "least_squares": LeastSquaresCompensation(x.double().mean(0), torch.cov(x.double().T, correction=0), 1e-6),
    }.items():
        with torch.no_grad():
            errors[name] = float((compensation.columns(linear, kept)(x[:, kept]) - linear(x)).pow(2).mean())
    assert errors["least_squares"] < 0.5 * errors["mean"]


# ---- every architecture (audit R3): slicing equals masking, dense and mixture-of-experts ----------------
IDS = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))


# every architecture whose tiny model has two KV groups (Gemma-3's has one: its MLP is tested below)
@pytest.mark.parametrize("model_type", [t for t in TINY_ARCHITECTURES if t != "gemma3_text"] + ["mixtral", "qwen3_moe"])
def test_removing_a_kv_group_equals_zeroing_it_on_every_architecture(model_type):
    sliced, masked = tiny_model(model_type), tiny_model(model_type)
    adapter_s, adapter_m = get_adapter(sliced), get_adapter(masked)
    layer = adapter_s.layers()[0]
    shape = adapter_s.attention_shape(layer)
    assert shape.num_kv_heads == 2
    q_kept, _ = group_channels(shape, torch.tensor([1]))
    slice_attention(adapter_s, layer, torch.tensor([1]))
    with torch.no_grad():
        o = adapter_m.o_proj(adapter_m.layers()[0])
        keep = torch.zeros(o.in_features, dtype=torch.bool)
        keep[q_kept] = True
        o.weight[:, ~keep] = 0
    torch.testing.assert_close(_logits(sliced, IDS), _logits(masked, IDS))
    assert adapter_s.attention_shape(layer).num_kv_heads == 1
    assert adapter_s.attention_shape(layer).num_heads == 3


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES)
def test_removing_mlp_channels_equals_zeroing_them_on_every_architecture(model_type):
    sliced, masked = tiny_model(model_type), tiny_model(model_type)
    adapter_s, adapter_m = get_adapter(sliced), get_adapter(masked)
    kept = torch.arange(0, 160, 3)
    slice_mlp(adapter_s, adapter_s.layers()[1], kept)
    with torch.no_grad():
        down = adapter_m.down_proj(adapter_m.layers()[1])
        removed = torch.ones(160, dtype=torch.bool)
        removed[kept] = False
        down.weight[:, removed] = 0
    torch.testing.assert_close(_logits(sliced, IDS), _logits(masked, IDS))
    assert adapter_s.intermediate_size(adapter_s.layers()[1]) == len(kept)


@pytest.mark.parametrize("model_type", TINY_MOE_ARCHITECTURES)
def test_removing_expert_channels_equals_zeroing_them(model_type):
    from compress.arch.moe import expert_linears, routed_experts
    from compress.ops.slicing import slice_experts

    sliced, masked = tiny_model(model_type), tiny_model(model_type)
    adapter_s, adapter_m = get_adapter(sliced), get_adapter(masked)
    experts = adapter_s.experts(adapter_s.layers()[1])
    count, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[-1]
    kept = torch.stack([torch.randperm(width, generator=torch.Generator().manual_seed(e))[:width // 2].sort().values
                        for e in range(count)])
    slice_experts(adapter_s, adapter_s.layers()[1], kept)
    with torch.no_grad():
        for e, (_, _, down) in enumerate(expert_linears(adapter_m.experts(adapter_m.layers()[1]))):
            removed = torch.ones(width, dtype=torch.bool)
            removed[kept[e]] = False
            down.weight[:, removed] = 0
    with routed_experts([adapter_s.experts(layer) for layer in adapter_s.layers()]), \
            routed_experts([adapter_m.experts(layer) for layer in adapter_m.layers()]):
        torch.testing.assert_close(_logits(sliced, IDS), _logits(masked, IDS))
    assert adapter_s.experts(adapter_s.layers()[1]).down_proj.shape[-1] == width // 2
