"""NaN/Inf stops the run with the decoder layer and module named, for every kind of method."""

import pytest
import torch

import compress
from calibration.gradients import gradient_norms
from compress.arch import get_adapter
from compress.errors import NumericalError
from tests.conftest import tiny_llama


def _poisoned_model_dir(tmp_path, tiny_model_dir, module: str):
    import shutil
    folder = tmp_path / "poisoned"
    shutil.copytree(tiny_model_dir, folder)
    model = tiny_llama()
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.decoder_linears(adapter.layers()[1])[module].weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["flap", "wanda", "wanda_sp"])
@pytest.mark.parametrize("module", ["self_attn.k_proj", "mlp.up_proj"])
def test_nan_weight_is_reported_with_layer_and_module(method, module, tiny_recipe, tiny_model_dir, tmp_path):
    tiny_recipe["model"]["name"] = str(_poisoned_model_dir(tmp_path, tiny_model_dir, module))
    tiny_recipe["stages"] = [{"method": method, "sparsity": 0.3}]
    tiny_recipe["eval"]["dense"] = False
    with pytest.raises(NumericalError, match=rf"{module} of decoder layer 1"):
        compress.run(tiny_recipe, progress=False, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_nan_gradients_are_reported():
    model = tiny_llama()
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.down_proj(adapter.layers()[2]).weight[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="NaN or Inf"):
        gradient_norms(adapter, torch.randint(0, 320, (2, 16)))
