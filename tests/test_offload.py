"""Bigger than memory: a tiny model forced to disk by max_memory prunes to the same weights as in memory."""

import pytest
import torch
from safetensors.torch import load_file

from compress.arch import get_adapter
from compress.model.offload import is_offloaded, onloaded
from compress.recipe import load_recipe
from compress.runner import pipeline

FORCE_DISK = {"cpu": "40KB"}  # below one decoder layer of the tiny model: every layer goes to disk


def run(tiny_recipe, tmp_path, name, stages, offload):
    recipe = {**tiny_recipe, "stages": stages, "export": {"output": str(tmp_path / name)}}
    if offload:
        recipe["model"] = {**recipe["model"], "max_memory": FORCE_DISK, "offload_folder": str(tmp_path / "offload")}
    logs = []
    report = pipeline.run(load_recipe(recipe), progress=False, log=logs.append)
    return report, load_file(tmp_path / name / "model.safetensors"), logs


@pytest.mark.parametrize("stages", [
    [{"method": "flap", "sparsity": 0.3}],
    [{"method": "flap", "sparsity": 0.3, "structure": "UL-UM", "uniform": True}],
    [{"method": "wanda_sp", "sparsity": 0.3}],
    [{"method": "wanda", "pattern": "2:4"}],
    [{"method": "cfsp", "sparsity": 0.3, "targets": "both"}],
    [{"method": "flap", "sparsity": 0.2, "round_to": 8}, {"method": "magnitude", "pattern": "2:4"}],
], ids=["flap", "flap-uniform", "wanda_sp", "wanda-2:4", "cfsp", "flap+magnitude-2:4"])
def test_disk_offloaded_run_prunes_to_the_same_weights(tiny_recipe, tmp_path, stages):
    memory_report, memory_weights, _ = run(tiny_recipe, tmp_path, "memory", stages, offload=False)
    disk_report, disk_weights, logs = run(tiny_recipe, tmp_path, "disk", stages, offload=True)
    assert any("3 of 3 decoder layers on disk" in line for line in logs)
    assert memory_weights.keys() == disk_weights.keys()
    for key in memory_weights:
        assert torch.equal(memory_weights[key], disk_weights[key]), key
    assert disk_report["ppl"]["pruned"] == pytest.approx(memory_report["ppl"]["pruned"], rel=1e-6)
    assert not list((tmp_path / "offload").iterdir())  # the working copies are gone


def test_onloaded_layer_is_in_memory_inside_and_on_disk_after(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map="auto", max_memory=dict(FORCE_DISK),
                                                 offload_folder=str(tmp_path / "acc"))
    layer = get_adapter(model).layers()[1]
    assert is_offloaded(layer) and layer.mlp.up_proj.weight.device.type == "meta"
    with onloaded(layer, tmp_path / "store", "layer-1"):
        assert layer.mlp.up_proj.weight.device.type == "cpu"
        with torch.no_grad():
            layer.mlp.up_proj.weight.zero_()
    assert is_offloaded(layer) and layer.mlp.up_proj.weight.device.type == "meta"
    assert (tmp_path / "store" / "layer-1.safetensors").is_file()
    with onloaded(layer, None, write_back=False):  # read-only: the change was kept
        assert not layer.mlp.up_proj.weight.any()


def test_recovery_refuses_a_model_on_disk(tiny_recipe, tmp_path, text_files):
    from compress.errors import UserError

    stages = [{"method": "flap", "sparsity": 0.3},
              {"method": "lora", "steps": 2, "batch_size": 2, "seq_len": 16,
               "data": {"path": str(text_files["calibration"])}}]
    with pytest.raises(UserError, match="needs every layer in memory"):
        run(tiny_recipe, tmp_path, "lora", stages, offload=True)


def test_half_precision_offloaded_export_checks_the_reload_in_its_own_dtype(tiny_recipe, tmp_path, monkeypatch):
    """Audit R9/D5: the reload check of a bfloat16 model no longer needs a float32 copy of it (it used to call
    model.float(), and preflight refused offloaded half-precision recipes); it compares in bfloat16."""
    import transformers

    casts = []
    monkeypatch.setattr(transformers.PreTrainedModel, "float", lambda self, *a: casts.append(1) or self)
    recipe = {**tiny_recipe, "stages": [{"method": "flap", "sparsity": 0.3}],
              "export": {"output": str(tmp_path / "bf16")},
              "model": {**tiny_recipe["model"], "dtype": "bfloat16", "max_memory": FORCE_DISK,
                        "offload_folder": str(tmp_path / "offload")}}
    report = pipeline.run(load_recipe(recipe), progress=False, log=lambda _: None)
    assert not casts
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert report["export"]["reload_max_abs_logit_diff"] is not None
    assert report["export"]["reload_max_abs_logit_diff"] < 0.66
