"""Mixture-of-experts models (Mixtral, Qwen3-MoE, OLMoE): experts are pruned as MLPs on the tokens routed
to them (single weights, or channels with one width per layer and each expert its own channels),
exports load with the stock classes; GBLM takes each expert's gradients from the fused tensors. FLAP 30% /
Wanda 2:4 on every MoE adapter are in the architecture matrix (tests/test_architectures.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.arch import get_adapter
from compress.ops.masks import follows_nm, zero_fraction
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
    model = idle_expert_mixtral()
    before = model.model.layers[1].mlp.experts.gate_up_proj[4].clone()
    model_dir = save(model, tmp_path / "model")
    report = compress.run(recipe(model_dir, text_files, tmp_path / "out", [{"method": "wanda", "pattern": "2:4"}]),
                          progress=False, log=lambda _: None)
    untouched = report["stages"][0]["untouched_no_calibration_tokens"]
    assert "layers.1.mlp.experts.4.gate_proj" in untouched and len(untouched) == 3 * 3  # 3 layers x (gate, up, down)
    saved = compress.load(tmp_path / "out").model.layers[1].mlp.experts.gate_up_proj[4]
    assert torch.equal(saved, before)


def test_gblm_prunes_experts_with_their_own_gradients(text_files, tmp_path):
    model_dir = save(tiny_model("qwen3_moe"), tmp_path / "model")
    stage = {"method": "gblm", "sparsity": 0.5, "pattern": "2:4", "cache_gradients": False}
    report = compress.run(recipe(model_dir, text_files, tmp_path / "out", [stage]), progress=False, log=lambda _: None)
    assert report["export"]["nm_pattern_verified"] == ["2:4"] and report["export"]["format"] == "stock"
    experts = compress.load(tmp_path / "out").model.layers[0].mlp.experts
    assert zero_fraction(experts.gate_up_proj) == pytest.approx(0.5, abs=0.01)


def idle_expert_mixtral():
    """A tiny Mixtral whose router never picks expert 4 (router rows a, -a, b, -b, 0: two logits are
    always >= 0 = expert 4's, so it is never in the top 2)."""
    from transformers import MixtralConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_local_experts=5, num_experts_per_tok=2))
    with torch.no_grad():
        for layer in model.model.layers:
            a, b = layer.mlp.gate.weight[0].clone(), layer.mlp.gate.weight[2].clone()
            layer.mlp.gate.weight.copy_(torch.stack([a, -a, b, -b, torch.zeros_like(a)]))
    return model


@pytest.mark.parametrize("method", ["flap", "wanda_sp", "cfsp"])
def test_structured_stages_give_every_expert_its_own_channels_at_one_width(method, text_files, tmp_path):
    model = tiny_model("olmoe")
    original = [(layer.mlp.experts.gate_up_proj.detach().clone(), layer.mlp.experts.down_proj.detach().clone())
                for layer in model.model.layers]
    model_dir = save(model, tmp_path / "model")
    output = tmp_path / "out"
    stage = {"method": method, "sparsity": 0.3, "compensation": "none"}
    report = compress.run(recipe(model_dir, text_files, output, [stage]), progress=False, log=lambda _: None)
    assert 0.2 < report["sparsity"]["achieved_decoder_linear"] < 0.4
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    pruned = AutoModelForCausalLM.from_pretrained(output,
                                                  trust_remote_code=report["export"]["trust_remote_code_needed"])
    # OLMoE's q/k norms span all heads: attention is kept, the experts carry the whole budget
    assert all(layer.self_attn.q_proj.out_features == 96 for layer in pruned.model.layers)
    distinct = 0
    for layer, (gate_up, down) in zip(pruned.model.layers, original):
        experts = layer.mlp.experts
        full, width = down.shape[-1], experts.down_proj.shape[-1]
        assert width % 8 == 0 and width < full  # grouped-matmul experts need 16-byte strides
        kept_sets = []
        for e in range(gate_up.shape[0]):
            # no compensation: each expert's rows / columns are a subset of its own, in order
            gate_rows = [int((gate_up[e, :full] == row).all(1).nonzero()[0]) for row in experts.gate_up_proj[e, :width]]
            assert gate_rows == sorted(gate_rows)
            assert torch.equal(experts.gate_up_proj[e, width:], gate_up[e, full:][gate_rows])
            assert torch.equal(experts.down_proj[e], down[e][:, gate_rows])
            kept_sets.append(tuple(gate_rows))
        distinct += len(set(kept_sets)) > 1
    assert distinct == len(original)  # experts choose different channels


def test_expert_slots_weigh_experts_by_their_tokens_and_rank_idle_experts_by_weights():
    from calibration.stats import ChannelStats
    from compress.methods.flap import Flap, FlapConfig

    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    method = Flap(FlapConfig(sparsity=0.3, structure="UL-UM"))
    torch.manual_seed(0)
    stats = {}
    for e, tokens in enumerate((30, 10, 0, 60)):
        stats[f"mlp.{e}"] = ChannelStats(f"expert {e}", adapter.intermediate_size(layer))
        if tokens:
            stats[f"mlp.{e}"].update(torch.randn(tokens, adapter.intermediate_size(layer)) * (e + 1))
    slots, order, idle = method.expert_scores(adapter, layer, stats)
    assert idle == [2]
    from compress.arch.moe import expert_linears

    rows = [method.mlp_scores(*expert_linears(adapter.experts(layer))[e], stats[f"mlp.{e}"])
            .sort(descending=True).values
            for e in (0, 1, 3)]
    expected = 0.3 * rows[0] + 0.1 * rows[1] + 0.6 * rows[2]
    assert torch.allclose(slots, expected, rtol=1e-5)
    assert (slots[:-1] >= slots[1:]).all()  # a width keeps a prefix of the slots
    gate, up, down = expert_linears(adapter.experts(layer))[2]
    norms = down.weight.norm(dim=0) * up.weight.norm(dim=1) * gate.weight.norm(dim=1)
    assert torch.equal(order[2], norms.sort(descending=True, stable=True).indices)


def test_an_expert_without_tokens_is_reported_and_still_fits_the_layer_width(text_files, tmp_path):
    model_dir = save(idle_expert_mixtral(), tmp_path / "model")
    report = compress.run(recipe(model_dir, text_files, tmp_path / "out", [{"method": "flap", "sparsity": 0.3}]),
                          progress=False, log=lambda _: None)
    assert report["stages"][0]["experts_without_calibration_tokens"] == [f"layers.{i}.mlp.experts.4" for i in range(3)]
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4


def _lora(text_files, **overrides):
    stage = {"method": "lora", "steps": 3, "batch_size": 2, "seq_len": 32, "warmup_steps": 0,
             "learning_rate": 1e-2, "data": {"path": str(text_files["calibration"])}}
    return {**stage, **overrides}


@pytest.mark.parametrize("model_type", TINY_MOE_ARCHITECTURES)
def test_lora_recovery_adapts_the_expert_banks_the_same_way_in_every_family(model_type, text_files, tmp_path):
    """peft renames the MLP targets to the expert banks only for some families (Qwen-MoE, OLMoE) and then
    refuses dropout; Mixtral's experts it never found. Now: the banks are adapted in every family when dropout
    is 0, kept frozen (and said so) otherwise; 2:4 masks survive the merge in the experts too."""
    source = tiny_model(model_type)
    model_dir = save(source, tmp_path / "model")
    for dropout, adapted in ((0.0, True), (0.05, False)):
        output = tmp_path / f"out-{dropout}"
        stages = [{"method": "wanda", "pattern": "2:4"}, _lora(text_files, dropout=dropout)]
        report = compress.run(recipe(model_dir, text_files, output, stages), progress=False, log=lambda _: None)
        details = report["stages"][1]
        assert details["experts_adapted"] is adapted
        assert report["export"]["nm_pattern_verified"] == ["2:4"]
        tuned = get_adapter(compress.load(output))
        reference = get_adapter(source)
        layer, before = tuned.layers()[0], reference.layers()[0]
        down = tuned.experts(layer).down_proj
        experts_changed = not torch.equal(down, reference.experts(before).down_proj.masked_fill(down == 0, 0))
        assert experts_changed is adapted, (dropout, model_type)
        for name, linear in tuned.decoder_linears(layer).items():
            assert follows_nm(linear.weight, 2, 4), name
    # 4 experts x rank 8 on down_proj, 2 x 4 x 8 on gate_up (gate and up fused: rank 8 each), per MoE layer
    layers, experts = len(reference.layers()), reference.experts(reference.layers()[0]).down_proj.shape[0]
    hidden, width = source.config.hidden_size, reference.intermediate_size(reference.layers()[0])
    banks = layers * experts * 8 * ((hidden + width) + 2 * (hidden + 2 * width))
    frozen = report["stages"][1]["trainable_params"]
    compress.run(recipe(model_dir, text_files, tmp_path / "zero", [_lora(text_files, dropout=0.0)]), progress=False,
                 log=lambda _: None)
    adapted = json.loads((tmp_path / "zero" / "report.json").read_text())["stages"][0]["trainable_params"]
    assert adapted - frozen == banks


def test_lora_on_only_one_of_the_fused_gate_and_up_is_refused(text_files, tmp_path):
    model_dir = save(tiny_model("mixtral"), tmp_path / "model")
    stage = _lora(text_files, dropout=0.0, target_modules=["q_proj", "gate_proj"])
    with pytest.raises(compress.errors.UserError, match="gate_up_proj"):
        compress.run(recipe(model_dir, text_files, tmp_path / "out", [stage]), progress=False, log=lambda _: None)

