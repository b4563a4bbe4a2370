"""Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE): experts are pruned as MLPs on the tokens routed
to them, exports load with the stock classes, structured stages are refused before loading."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.arch import get_adapter
from compress.errors import UserError
from compress.masks import follows_nm, zero_fraction
from tests.conftest import TINY_MOE_ARCHITECTURES, tiny_model, tiny_tokenizer
from tests.test_architectures import _logits as logits
from tests.test_architectures import _recipe as recipe


def save(model, folder):
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", TINY_MOE_ARCHITECTURES)
def test_routed_expert_views_reproduce_the_stock_forward(model_type):
    model, reference = tiny_model(model_type), tiny_model(model_type)
    adapter = get_adapter(model)
    names = list(adapter.decoder_linears(adapter.layers()[0]))  # installs the routed forward
    assert len(names) == 4 + 4 * 3 and "mlp.experts.3.down_proj" in names
    assert (logits(model) - logits(reference)).abs().max() < 1e-5


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
@pytest.mark.parametrize("model_type", TINY_MOE_ARCHITECTURES)
def test_wanda_on_experts_exports_to_the_stock_class(model_type, pattern, text_files, tmp_path):
    model_dir = save(tiny_model(model_type), tmp_path / "model")
    output = tmp_path / "out"
    report = compress.run(recipe(model_dir, text_files, output, [{"method": "wanda", "pattern": pattern}]),
                          progress=False, log=lambda _: None)
    assert report["export"]["format"] == "stock" and report["export"]["reload_max_abs_logit_diff"] < 1e-4
    config = json.loads((output / "config.json").read_text())
    assert "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(output)  # no remote code
    ours = compress.load(output)
    assert (logits(stock) - logits(ours)).abs().max() < 1e-4
    adapter = get_adapter(stock)
    experts = adapter.experts(adapter.layers()[0])
    assert zero_fraction(experts.gate_up_proj) == pytest.approx(0.5, abs=0.01)
    assert zero_fraction(experts.down_proj) == pytest.approx(0.5, abs=0.01)
    for layer in adapter.layers():
        for name, linear in adapter.decoder_linears(layer).items():
            if pattern == "2:4":
                assert follows_nm(linear.weight, 2, 4), name
    assert stock.model.layers[0].mlp.gate.weight.count_nonzero() == stock.model.layers[0].mlp.gate.weight.numel()


def test_an_expert_the_router_never_picks_is_left_as_it_is(text_files, tmp_path):
    from transformers import MixtralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_local_experts=5, num_experts_per_tok=2))
    with torch.no_grad():
        for layer in model.model.layers:
            # router rows a, -a, b, -b, 0: two logits are always >= 0 = expert 4's, so expert 4 is never in the top 2
            a, b = layer.mlp.gate.weight[0].clone(), layer.mlp.gate.weight[2].clone()
            layer.mlp.gate.weight.copy_(torch.stack([a, -a, b, -b, torch.zeros_like(a)]))
    before = model.model.layers[1].mlp.experts.gate_up_proj[4].clone()
    model_dir = save(model, tmp_path / "model")
    report = compress.run(recipe(model_dir, text_files, tmp_path / "out", [{"method": "wanda", "pattern": "2:4"}]),
                          progress=False, log=lambda _: None)
    untouched = report["stages"][0]["untouched_no_calibration_tokens"]
    assert "layers.1.mlp.experts.4.gate_proj" in untouched and len(untouched) == 3 * 3  # 3 layers x (gate, up, down)
    saved = compress.load(tmp_path / "out").model.layers[1].mlp.experts.gate_up_proj[4]
    assert torch.equal(saved, before)


@pytest.mark.parametrize("stage", [{"method": "flap", "sparsity": 0.3}, {"method": "gblm"}])
def test_structured_and_gradient_stages_are_refused_before_loading(stage, text_files, tmp_path):
    model_dir = save(tiny_model("qwen3_moe"), tmp_path / "model")
    with pytest.raises(UserError, match="does not support mixture-of-experts models yet"):
        compress.run(recipe(model_dir, text_files, tmp_path / "out", [stage]), progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()
