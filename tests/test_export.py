"""Export -> reload -> same logits; stock config when uniform; nothing half-written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.arch import get_adapter
from compress.errors import UserError
from compress.export.checkpoint import check_output_dir, write_checkpoint
from compress.ops.slicing import slice_attention, slice_mlp
from tests.conftest import tiny_llama, tiny_tokenizer

IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _per_layer_model():
    model = tiny_llama()
    adapter = get_adapter(model)
    mean = torch.randn(160)
    slice_attention(adapter, adapter.layers()[0], torch.tensor([1]), torch.randn(96))
    slice_mlp(adapter, adapter.layers()[1], torch.arange(0, 160, 2), mean)
    return model, adapter


def _uniform_model():
    model = tiny_llama()
    adapter = get_adapter(model)
    for layer in adapter.layers():
        slice_attention(adapter, layer, torch.tensor([0]))
        slice_mlp(adapter, layer, torch.arange(100), torch.randn(160))
    return model, adapter


def test_per_layer_export_reloads_with_remote_code_and_with_compress_load(tmp_path):
    model, adapter = _per_layer_model()
    expected = _logits(model)
    facts = write_checkpoint(model, tiny_tokenizer(), adapter, tmp_path / "out", overwrite=False,
                             max_shard_size="2GB")
    assert facts["format"] == "per_layer" and facts["reload_max_abs_logit_diff"] < 1e-4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["per_layer_config"]["0"]["num_key_value_heads"] == 1
    torch.testing.assert_close(_logits(compress.load(tmp_path / "out")), expected)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    torch.testing.assert_close(_logits(remote), expected)


def test_per_layer_export_refuses_to_load_without_remote_code(tmp_path):
    model, adapter = _per_layer_model()
    write_checkpoint(model, None, adapter, tmp_path / "out", overwrite=False, max_shard_size="2GB")
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_uniform_export_is_a_stock_checkpoint(tmp_path):
    model, adapter = _uniform_model()
    expected = _logits(model)
    facts = write_checkpoint(model, tiny_tokenizer(), adapter, tmp_path / "out", overwrite=False,
                             max_shard_size="2GB")
    assert facts["format"] == "stock"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in config and "per_layer_config" not in config
    assert config["num_key_value_heads"] == 1 and config["intermediate_size"] == 100 and config["mlp_bias"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_logits(reloaded), expected)
    assert not (tmp_path / "out" / "modeling_pruned.py").exists()


def test_failed_verification_leaves_nothing_behind(tmp_path, monkeypatch):
    import compress.export.checkpoint as export

    model, adapter = _per_layer_model()
    monkeypatch.setattr(export, "max_logit_difference", lambda *a, **k: 1.0)
    with pytest.raises(RuntimeError, match="differs"):
        write_checkpoint(model, None, adapter, tmp_path / "out", overwrite=False, max_shard_size="2GB")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_rules(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        check_output_dir(str(tmp_path / "full"), overwrite=False)
    with pytest.raises(UserError, match="not one"):  # audit R5: not a compress checkpoint
        check_output_dir(str(tmp_path / "full"), overwrite=True)
    for name in ("report.json", "config.json"):
        (tmp_path / "full" / name).write_text("{}")
    assert check_output_dir(str(tmp_path / "full"), overwrite=True)
    (tmp_path / "full" / "model").mkdir()
    with pytest.raises(UserError, match="model being pruned"):
        check_output_dir(str(tmp_path / "full"), overwrite=True, source=str(tmp_path / "full" / "model"))
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "full")
        with pytest.raises(UserError, match="current folder"):
            check_output_dir(".", overwrite=True)
    finally:
        os.chdir(cwd)
    assert check_output_dir(str(tmp_path / "new"), overwrite=False)
    with pytest.raises(UserError, match="output=DIR"):
        check_output_dir(None, overwrite=False)


def test_sharded_export_reloads(tmp_path):
    model, adapter = _per_layer_model()
    expected = _logits(model)
    write_checkpoint(model, None, adapter, tmp_path / "out", overwrite=False, max_shard_size="200KB")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    torch.testing.assert_close(_logits(compress.load(tmp_path / "out")), expected)


def test_export_refuses_a_checkpoint_that_breaks_its_nm_pattern(tmp_path):
    from compress.ops.masks import apply_mask, nm_mask
    from tests.conftest import tiny_llama

    model = tiny_llama()
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            apply_mask(linear, nm_mask(linear.weight.abs(), 2, 4))
    facts = write_checkpoint(model, None, adapter, tmp_path / "ok", overwrite=False, max_shard_size="2GB",
                             nm_patterns=((2, 4),))
    assert facts["nm_pattern_verified"] == ["2:4"]
    with torch.no_grad():
        adapter.o_proj(adapter.layers()[1]).weight.fill_(0.5)  # densified, as a careless LoRA merge would
    with pytest.raises(RuntimeError, match="layers.1.self_attn.o_proj does not follow the 2:4"):
        write_checkpoint(model, None, adapter, tmp_path / "bad", overwrite=False, max_shard_size="2GB",
                         nm_patterns=((2, 4),))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))



def test_a_run_killed_between_the_two_renames_keeps_the_old_checkpoint(tmp_path):
    """Audit R5: the old checkpoint is set aside, never deleted, until the new one is in place; a run
    killed in between leaves it where the next run puts it back."""
    from compress.export.checkpoint import remove_stale_staging

    output = tmp_path / "out"
    aside = tmp_path / ".out.old-999999999"  # a process id that does not exist
    aside.mkdir()
    (aside / "report.json").write_text("old")
    remove_stale_staging(output)
    assert (output / "report.json").read_text() == "old" and not aside.exists()
