"""Every adapter (dense and mixture-of-experts): FLAP and Wanda 2:4 -> export -> reload gives the same logits;
uniform = stock class."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.arch import get_adapter
from compress.ops.masks import follows_nm
from tests.conftest import TINY_ARCHITECTURES, TINY_MOE_ARCHITECTURES, tiny_model, tiny_tokenizer

IDS = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES + TINY_MOE_ARCHITECTURES)
def model_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _recipe(model_dir, text_files, output, stages):
    return {"model": {"name": str(model_dir)},
            "calibration": {"path": str(text_files["calibration"]), "num_samples": 8, "seq_len": 32},
            "stages": stages, "export": {"output": str(output)},
            "eval": {"ppl": 2, "text": str(text_files["test"]), "seq_len": 32}}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def load_as_users_do(output, per_layer: bool):
    """The lines a transformers user writes: the tokenizer never needs remote code; a per-layer export
    needs trust_remote_code for the model and fails loudly without it; the pipeline generates."""
    from transformers import AutoModel, AutoTokenizer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer("The quick brown fox")["input_ids"]
    if per_layer:
        with pytest.raises(ValueError, match="custom code"):
            AutoModelForCausalLM.from_pretrained(output, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
        # the decoder alone (auto_map's AutoModel, what vLLM's Transformers backend builds) has the same layers;
        # MoE exports have none (transformers converts their per-expert keys on the causal-LM path only)
        if "AutoModel" in model.config.auto_map:
            decoder = AutoModel.from_pretrained(output, trust_remote_code=True)
            with torch.no_grad():
                ids = IDS.clamp_max(model.config.vocab_size - 1)
                assert torch.allclose(decoder(ids).last_hidden_state, model.model(ids).last_hidden_state, atol=1e-5)
        else:
            assert all(hasattr(layer.mlp, "experts") for layer in model.model.layers)
    else:
        model = AutoModelForCausalLM.from_pretrained(output)
    generate = pipeline("text-generation", model=str(output), trust_remote_code=per_layer)
    text = generate("The quick", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("The quick")
    return model


@pytest.mark.parametrize("uniform", [False, True], ids=["per-layer", "uniform"])
def test_flap_30_exports_and_reloads(model_dir, text_files, tmp_path, uniform):
    output = tmp_path / "out"
    # uniform + no compensation: no new biases, so every architecture keeps its stock config
    stage = {"method": "flap", "sparsity": 0.3, "uniform": uniform, "round_to": 8}
    if uniform:
        stage["compensation"] = "none"
    report = compress.run(_recipe(model_dir, text_files, output, [stage]), progress=False, log=lambda _: None)
    assert 0.2 < report["sparsity"]["achieved_decoder_linear"] < 0.4
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    ours = compress.load(output)
    config = json.loads((output / "config.json").read_text())
    if uniform:
        assert "per_layer_config" not in config and "auto_map" not in config
    # the stock config when every layer has the same widths, else the shipped modelling file
    stock = load_as_users_do(output, per_layer=report["export"]["format"] == "per_layer")
    assert (_logits(ours) - _logits(stock)).abs().max() < 1e-4
    adapter = get_adapter(ours)
    assert all(adapter.intermediate_size(layer) % 8 == 0 for layer in adapter.layers())


def test_wanda_2_4_exports_and_reloads(model_dir, text_files, tmp_path):
    output = tmp_path / "out"
    report = compress.run(_recipe(model_dir, text_files, output, [{"method": "wanda", "sparsity": 0.5,
                                                                   "pattern": "2:4"}]),
                          progress=False, log=lambda _: None)
    assert report["export"]["nm_pattern_verified"] == ["2:4"]
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    model = compress.load(output)
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            assert follows_nm(linear.weight, 2, 4)


def test_uniform_widths_with_biases_the_stock_class_cannot_hold_fall_back_to_per_layer(text_files, tmp_path):
    folder = tmp_path / "mistral"
    tiny_model("mistral").save_pretrained(folder)  # Mistral linears never have biases
    tiny_tokenizer().save_pretrained(folder)
    report = compress.run(_recipe(folder, text_files, tmp_path / "out", [{"method": "flap", "sparsity": 0.3,
                                                                          "uniform": True}]),
                          progress=False, log=lambda _: None)
    assert report["export"]["format"] == "per_layer"
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4


def test_per_layer_head_counts_load_with_the_standard_lines(text_files, tmp_path):
    """FLAP 60% removes KV groups, so the stock config's validator would meet per-layer head counts:
    the tokenizer must still load without remote code (it builds the config too)."""
    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    output = tmp_path / "out"
    compress.run(_recipe(folder, text_files, output, [{"method": "flap", "sparsity": 0.6}]), progress=False,
                 log=lambda _: None)
    config = json.loads((output / "config.json").read_text())
    heads = {entry["num_attention_heads"] for entry in config["per_layer_config"].values()}
    assert heads != {6}, heads  # fewer query heads than the source's 6: the case that broke AutoTokenizer
    assert config["model_type"] == "compress_pruned_llama" and config["compress_base"]["model_type"] == "llama"
    model = load_as_users_do(output, per_layer=True)
    assert (_logits(model) - _logits(compress.load(output))).abs().max() < 1e-4
