"""The gate that decides which linears become 2:4 semi-structured tensors, tested on CPU."""

import pytest
import torch

import compress
from compress.arch import get_adapter
from compress.errors import UserError
from compress.export.semi_structured import plan, require_sparse_gpu, shape_constraints
from compress.ops.masks import apply_mask, nm_mask
from tests.conftest import tiny_llama


def _two_four(model):
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            apply_mask(linear, nm_mask(linear.weight.abs(), 2, 4))
    return adapter


def test_every_2_4_linear_of_kernel_friendly_shape_is_converted():
    # widths that are multiples of 64 (fp16 tiles are 32 rows x 64 columns)
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32)
    _two_four(model)
    decisions = plan(model, torch.float16)
    assert len(decisions) == 3 * 7 and all(d.convert for d in decisions)


def test_dense_wrong_shape_and_wrong_dtype_linears_stay_dense_with_a_reason():
    model = tiny_llama(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32)
    adapter = _two_four(model)
    with torch.no_grad():
        adapter.o_proj(adapter.layers()[0]).weight.fill_(1.0)  # dense again
    reasons = {d.name: d.reason for d in plan(model, torch.float16) if not d.convert}
    assert reasons == {"layers.0.self_attn.o_proj": "weight is not 2:4 sparse"}
    # k/v projections have 2 x 32 = 64 rows: fine; the tiny default model's 96-wide inputs are not
    small = tiny_llama()
    _two_four(small)
    bad = [d for d in plan(small, torch.float16) if not d.convert]
    assert bad and all("not a multiple of 32x64" in d.reason for d in bad)
    assert all("no 2:4 kernel" in d.reason for d in plan(small, torch.float64))


def test_constraints_come_from_the_installed_torch():
    limits = shape_constraints()
    assert limits[torch.float16] == (32, 64) and torch.bfloat16 in limits


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_without_a_sparse_gpu_the_message_says_why(tmp_path):
    with pytest.raises(UserError, match="compute capability >= 8.0"):
        require_sparse_gpu()
    with pytest.raises(UserError, match="no CUDA device"):
        compress.load(tmp_path, semi_structured=True)  # fails before touching the folder


def test_mixture_of_experts_experts_stay_dense_and_attention_converts():
    """Audit D8: expert views (into fused 3-D tensors) have no weight of their own to replace, so the
    plan keeps them dense with a reason instead of marking them convertible (convert() then crashed)."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _two_four(model)
    decisions = plan(model, torch.float16)
    experts = [d for d in decisions if ".experts." in d.name]
    others = [d for d in decisions if ".experts." not in d.name]
    assert experts and all(not d.convert and "mixture-of-experts" in d.reason for d in experts)
    assert others and all(d.convert for d in others)
