"""Per-sample gradient norms: equal to a brute-force computation, with or without checkpointing; cached."""

import pytest
import torch

from calibration.gradients import cached_gradient_norms, gradient_norms, linear_key
from compress.arch import get_adapter
from tests.conftest import tiny_llama, tiny_model

WINDOWS = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(1))


def brute_force(model, norm):
    adapter = get_adapter(model)
    named = {linear_key(i, n): lin.weight for i, layer in enumerate(adapter.layers())
             for n, lin in adapter.decoder_linears(layer).items()}
    total = {k: torch.zeros_like(w) for k, w in named.items()}
    for sample in WINDOWS:
        model.zero_grad()
        model(input_ids=sample[None], labels=sample[None]).loss.backward()
        for k, w in named.items():
            total[k] += w.grad.square() if norm == "l2" else w.grad.abs()
    return {k: v.sqrt() if norm == "l2" else v for k, v in total.items()}


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_gradient_norms_match_per_sample_backward(norm, checkpointing):
    model = tiny_llama()
    expected = brute_force(tiny_llama(), norm)
    result = gradient_norms(get_adapter(model), WINDOWS, norm, checkpointing)
    assert result.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(result[key], expected[key], rtol=1e-4, atol=1e-7)
    # the model is left as it was: no grads, frozen flags restored, eval mode
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not model.training


def test_gradients_are_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    adapter = get_adapter(tiny_llama())
    messages = []
    first = cached_gradient_norms(adapter, WINDOWS, log=messages.append)
    second = cached_gradient_norms(adapter, WINDOWS, log=messages.append)
    assert "cached in" in messages[0] and "reusing" in messages[1]
    assert len(list((tmp_path / "gradients").glob("*.safetensors"))) == 1
    for key in first:
        assert torch.equal(first[key], second[key])
    # other data -> other fingerprint -> computed again
    cached_gradient_norms(adapter, WINDOWS[:2], log=messages.append)
    assert len(list((tmp_path / "gradients").glob("*.safetensors"))) == 2


def test_expert_gradients_are_cut_from_the_fused_tensors():
    """MoE: per-sample gradients of the stock model's fused expert tensors, sliced by hand, equal
    what GBLM gets for each expert's gate / up / down projection."""
    model = tiny_model("mixtral")
    reference = tiny_model("mixtral")  # stock forward, untouched by the views
    total = {}
    for sample in WINDOWS:
        reference.zero_grad()
        reference(input_ids=sample[None], labels=sample[None]).loss.backward()
        for i, layer in enumerate(reference.model.layers):
            experts = layer.mlp.experts
            width = experts.down_proj.shape[-1]
            for e in range(experts.down_proj.shape[0]):
                grads = {"gate_proj": experts.gate_up_proj.grad[e, :width],
                         "up_proj": experts.gate_up_proj.grad[e, width:],
                         "down_proj": experts.down_proj.grad[e]}
                for name, grad in grads.items():
                    key = linear_key(i, f"mlp.experts.{e}.{name}")
                    total[key] = total.get(key, 0) + grad.square()
    result = gradient_norms(get_adapter(model), WINDOWS, "l2", checkpointing=True)
    assert len(result) == 3 * (4 + 4 * 3)  # 3 layers x (q, k, v, o + 4 experts x gate, up, down)
    for key, value in total.items():
        torch.testing.assert_close(result[key], value.sqrt(), rtol=1e-4, atol=1e-7)
