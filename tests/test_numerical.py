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


def test_statistics_keep_the_variance_of_large_mean_channels():
    """Audit R1: E[x^2] - mean^2 in float32 gave variance 0.0 (and a covariance with negative
    eigenvalues) for channels at mean 300, std 0.05; shifted float64 moments keep every digit needed."""
    from calibration.stats import ChannelStats

    generator = torch.Generator().manual_seed(0)
    stats = ChannelStats("demo", 4, second_moment_stride=1)
    batches = [300.0 + 0.05 * torch.randn(2048, 4, generator=generator) for _ in range(32)]
    for batch in batches:
        stats.update(batch)
    x = torch.cat(batches).double()
    true_variance = x.var(0, unbiased=False)
    assert torch.allclose(stats.variance.double(), true_variance, rtol=1e-4)
    true_covariance = torch.cov(x.T, correction=0)
    assert torch.allclose(stats.covariance(), true_covariance, rtol=1e-4, atol=1e-9)
    assert torch.linalg.eigvalsh(stats.covariance()).min() > 0
    true_moment = x.T @ x / x.shape[0]
    assert torch.allclose(stats.second_moment(), true_moment, rtol=1e-9)
    assert torch.allclose(stats.l2_norm.double(), x.pow(2).sum(0).sqrt(), rtol=1e-6)
    plain = ChannelStats("demo", 4)  # no second moment: the sum of squares is accumulated on its own
    for batch in batches:
        plain.update(batch)
    assert torch.allclose(plain.variance.double(), true_variance, rtol=1e-4)
    assert torch.allclose(plain.l2_norm, stats.l2_norm, rtol=1e-6)
    assert torch.allclose(plain.mean.double(), x.mean(0), rtol=1e-7)


def test_strip_second_moment_is_symmetric_when_read_between_updates():
    """Wider than one strip, only the upper triangle is summed and mirrored when read: reading the second
    moment, then adding batches, then reading again must give the full symmetric E[x x^T] both times."""
    from calibration.stats import STRIP, ChannelStats

    generator = torch.Generator().manual_seed(1)
    width = STRIP + 77
    stats = ChannelStats("wide", width, second_moment_stride=1)
    batches = [0.5 + torch.randn(256, width, generator=generator) for _ in range(6)]
    for count, batch in enumerate(batches, start=1):
        stats.update(batch)
        if count in (2, 6):
            x = torch.cat(batches[:count]).double()
            moment = stats.second_moment()
            assert torch.equal(moment, moment.T)
            assert torch.allclose(moment, x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)  # float32 products
