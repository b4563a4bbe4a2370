"""Wanda and magnitude on a tiny model: exact zero counts, exact N:M, identity at 0, reload keeps the pattern."""

import pytest
import torch

import compress
from calibration.capture import LayerwiseCapture
from compress.arch import get_adapter
from compress.methods import METHODS
from compress.methods.base import StageContext
from compress.ops.masks import follows_nm, zero_fraction
from tests.conftest import TINY_ARCHITECTURES, TINY_MOE_ARCHITECTURES, tiny_llama

WINDOWS = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _gradient_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))


def prune(model, method, **config):
    adapter = get_adapter(model)
    cls = METHODS[method]
    ctx = StageContext(adapter, lambda passes: LayerwiseCapture(adapter, WINDOWS, 4), log=lambda _: None,
                       windows=WINDOWS)
    return cls(cls.Config(method=method, **config)).run(ctx)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "gblm", "sparsegpt"])
def test_sparsity_zero_is_the_identity(method):
    model, reference = tiny_llama(), tiny_llama()
    prune(model, method, sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(model(WINDOWS[:2]).logits, reference(WINDOWS[:2]).logits)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "gblm", "sparsegpt"])
def test_unstructured_half_zeroes_half_of_every_linear(method):
    model = tiny_llama()
    details = prune(model, method, sparsity=0.5)
    for layer in get_adapter(model).layers():
        for linear in get_adapter(model).decoder_linears(layer).values():
            assert zero_fraction(linear.weight) == pytest.approx(0.5, abs=0.01)
    assert len(details["zero_fraction_per_linear"]) == 3 * 7


@pytest.mark.parametrize("method", ["wanda", "magnitude", "gblm", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns_are_exact(method, pattern):
    model = tiny_llama()
    prune(model, method, sparsity=0.5, pattern=pattern)
    n, m = map(int, pattern.split(":"))
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            assert follows_nm(linear.weight, n, m)


def test_wanda_prunes_weights_of_silent_inputs_first():
    model = tiny_llama(num_hidden_layers=1)
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    with torch.no_grad():  # MLP channel 5 never fires: its down_proj input is always 0
        adapter.gate_up(layer)[1].weight[5] = 0
    prune(model, "wanda", sparsity=0.25)
    assert (adapter.down_proj(layer).weight[:, 5] == 0).all()


def test_wanda_2_4_checkpoint_reloads_with_the_pattern(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}]
    report = compress.run(tiny_recipe, progress=False, log=lambda _: None)
    assert report["stages"][0]["pattern"] == "2:4"
    assert report["export"]["nm_pattern_verified"] == ["2:4"]
    model = compress.load(tmp_path / "out")
    adapter = get_adapter(model)
    for layer in adapter.layers():
        for linear in adapter.decoder_linears(layer).values():
            assert follows_nm(linear.weight, 2, 4)


def test_gblm_without_gradient_term_is_wanda():
    wanda, gblm = tiny_llama(), tiny_llama()
    prune(wanda, "wanda", sparsity=0.5)
    prune(gblm, "gblm", sparsity=0.5, alpha=0.0, scaling="paper")
    for a, b in zip(wanda.parameters(), gblm.parameters()):
        assert torch.equal(a, b)


def test_gblm_gradient_term_changes_the_mask():
    wanda, gblm = tiny_llama(), tiny_llama()
    prune(wanda, "wanda", sparsity=0.5)
    prune(gblm, "gblm", sparsity=0.5, alpha=100.0)
    changed = [not torch.equal(a, b) for a, b in zip(wanda.parameters(), gblm.parameters())]
    assert any(changed)


def test_owl_layer_sparsities_average_to_the_target_and_stay_in_range():
    model = tiny_llama(num_hidden_layers=4)
    details = prune(model, "wanda", sparsity=0.5, owl=True, owl_lambda=0.1, owl_threshold=2.0)
    layer_sparsity = details["layer_sparsity"]
    assert sum(layer_sparsity) / 4 == pytest.approx(0.5)
    assert max(layer_sparsity) - min(layer_sparsity) == pytest.approx(0.2)
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.layers()):
        for linear in adapter.decoder_linears(layer).values():
            assert zero_fraction(linear.weight) == pytest.approx(layer_sparsity[index], abs=0.02)


def test_owl_gives_layers_with_more_outliers_fewer_zeros():
    from compress.methods.weight import owl_allocation
    sparsities = owl_allocation([0.01, 0.05, 0.03], sparsity=0.6, spread=0.08)
    assert sparsities[1] < sparsities[2] < sparsities[0]
    assert sparsities == pytest.approx([0.68, 0.52, 0.60])
    assert owl_allocation([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]


def test_owl_with_nm_pattern_is_rejected():
    from compress.errors import UserError
    from compress.recipe import load_recipe
    with pytest.raises(UserError, match="owl"):
        load_recipe({"stages": [{"method": "wanda", "pattern": "2:4", "owl": True}]})


def test_flap_then_wanda_2_4_composes_and_reloads_exactly(tiny_recipe, tmp_path):
    tiny_recipe["stages"] = [{"method": "flap", "sparsity": 0.3, "round_to": 8},
                             {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}]
    report = compress.run(tiny_recipe, progress=False, log=lambda _: None)
    assert 0.25 < report["sparsity"]["achieved_decoder_linear"] < 0.35  # FLAP removed parameters
    assert report["sparsity"]["zero_fraction_decoder_linear"] >= 0.5  # Wanda zeroed half of the rest
    model = compress.load(tmp_path / "out")
    adapter = get_adapter(model)
    for layer in adapter.layers():
        assert adapter.intermediate_size(layer) % 8 == 0
        for linear in adapter.decoder_linears(layer).values():
            assert follows_nm(linear.weight, 2, 4)


def test_dense_inputs_take_every_statistic_from_the_dense_model():
    from calibration.stats import input_stats
    from compress.ops.masks import make_mask
    reference = tiny_llama()
    adapter = get_adapter(reference)
    capture = LayerwiseCapture(adapter, WINDOWS, 4)
    expected = {}
    for index, layer in capture.layers():  # dense statistics, no pruning in between
        with input_stats(adapter.decoder_linears(layer)) as stats:
            capture.forward(index, layer)
        for name, linear in adapter.decoder_linears(layer).items():
            score = linear.weight.abs() * stats[name].l2_norm[None, :]
            expected[(index, name)] = linear.weight * make_mask(score, 0.5)
    model = tiny_llama()
    prune(model, "wanda", sparsity=0.5, inputs="dense")
    pruned = get_adapter(model)
    for index, layer in enumerate(pruned.layers()):
        for name, linear in pruned.decoder_linears(layer).items():
            assert torch.equal(linear.weight, expected[(index, name)])
    sequential = tiny_llama()
    prune(sequential, "wanda", sparsity=0.5)
    assert not torch.equal(get_adapter(sequential).down_proj(get_adapter(sequential).layers()[2]).weight,
                           pruned.down_proj(pruned.layers()[2]).weight)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_within_layer_measures_later_levels_on_the_pruned_layer(model_type):
    """q/k/v see the same inputs either way; o, the MLP and down then see the pruned q/k/v's effects."""
    from compress.arch.moe import model_experts, routed_experts
    from tests.conftest import tiny_model

    default, within = tiny_model(model_type), tiny_model(model_type)
    prune(default, "sparsegpt", sparsity=0.5, pattern="2:4", within_layer=False)
    prune(within, "sparsegpt", sparsity=0.5, pattern="2:4", within_layer=True)
    adapter_d, adapter_w = get_adapter(default), get_adapter(within)
    first_d = adapter_d.decoder_linears(adapter_d.layers()[0])
    first_w = adapter_w.decoder_linears(adapter_w.layers()[0])
    for name in first_d:
        qkv = name.split(".")[-1] in (adapter_d.q_name, adapter_d.k_name, adapter_d.v_name)
        assert torch.equal(first_d[name].weight, first_w[name].weight) == qkv, name
        assert follows_nm(first_w[name].weight, 2, 4)
    with routed_experts(model_experts(adapter_w)), torch.no_grad():
        assert torch.isfinite(within(WINDOWS[:2]).logits).all()


@pytest.mark.parametrize("model_type", TINY_ARCHITECTURES + TINY_MOE_ARCHITECTURES)
def test_within_layer_replayed_attention_prunes_as_full_passes_do(model_type, monkeypatch):
    """The within-layer passes after o_proj replay the attention from its recorded inputs (the MLP runs in
    full: in the down pass and the outputs' pass): the pruned weights are those of full passes, on every
    architecture."""
    from calibration.capture import LayerwiseCapture
    from tests.conftest import tiny_model

    def pruned(replay: bool):
        model = tiny_model(model_type)
        adapter = get_adapter(model)
        calls, mlp_calls = [], []
        adapter.qkv(adapter.layers()[0])[0].register_forward_hook(lambda *_: calls.append(1))
        if not getattr(adapter, "is_moe", False):
            adapter.gate_up(adapter.layers()[0])[0].register_forward_hook(lambda *_: mlp_calls.append(1))
        with monkeypatch.context() as patch:
            if not replay:
                patch.setattr(LayerwiseCapture, "forward",
                              lambda self, *args, replay=None, **kwargs: full_forward(self, *args, **kwargs))
            prune(model, "sparsegpt", sparsity=0.5, pattern="2:4", within_layer=True)
        return model, len(calls), len(mlp_calls)

    full_forward = LayerwiseCapture.forward
    (replayed, replayed_calls, replayed_mlp), (full, full_calls, full_mlp) = pruned(True), pruned(False)
    batches = full_calls // 4  # full: q/k/v run in the passes of o, the MLP inputs, down and the outputs
    assert replayed_calls == batches + 3  # replayed: the o pass, then one checking batch per later pass
    moe = getattr(get_adapter(replayed), "is_moe", False)
    # both: the down pass and the outputs' pass (down_proj's inputs are not kept)
    assert full_mlp == replayed_mlp == (0 if moe else 2 * batches)
    for a, b in zip(replayed.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_within_layer_and_dense_inputs_are_refused_together():
    from compress.errors import UserError
    from compress.recipe import load_recipe

    with pytest.raises(UserError, match="within_layer"):
        load_recipe({"stages": [{"method": "sparsegpt", "inputs": "dense", "within_layer": True}]})
    # SparseGPT's default is within_layer: true, which an explicit inputs=dense turns off
    assert load_recipe({"stages": [{"method": "sparsegpt"}]}).stages[0].within_layer
    assert not load_recipe({"stages": [{"method": "sparsegpt", "inputs": "dense"}]}).stages[0].within_layer
    assert not load_recipe({"stages": [{"method": "wanda"}]}).stages[0].within_layer


def test_sparsegpt_refit_keeps_the_sweeps_masks_and_brings_the_outputs_closer_to_dense():
    """refit_iterations re-fits the kept weights only: layer 0's q/k/v (pruned first, from the same Hessian)
    keep the sweep's zeros exactly, and the pruned model's logits move toward the dense model's."""
    dense, swept, refit = tiny_llama(), tiny_llama(), tiny_llama()
    prune(swept, "sparsegpt", sparsity=0.5, pattern="2:4", refit_iterations=0)
    prune(refit, "sparsegpt", sparsity=0.5, pattern="2:4")  # the default re-fits (20 iterations)
    adapter_s, adapter_r = get_adapter(swept), get_adapter(refit)
    first_s = adapter_s.decoder_linears(adapter_s.layers()[0])
    first_r = adapter_r.decoder_linears(adapter_r.layers()[0])
    for name in first_s:
        if name.split(".")[-1] in (adapter_s.q_name, adapter_s.k_name, adapter_s.v_name):
            assert torch.equal(first_s[name].weight == 0, first_r[name].weight == 0), name
            assert not torch.equal(first_s[name].weight, first_r[name].weight), name
        assert follows_nm(first_r[name].weight, 2, 4)
    with torch.no_grad():
        target = dense(WINDOWS).logits
        error_swept = (swept(WINDOWS).logits - target).pow(2).mean()
        error_refit = (refit(WINDOWS).logits - target).pow(2).mean()
    assert error_refit < 0.9 * error_swept, (float(error_refit), float(error_swept))
