"""ARMOR: the discrete step is the brute-force optimum and never raises the loss; iteration 0 with init=nowag
is NoWag-P; the factorized export reloads with the same logits, as users load it; refusals name the fix."""

import itertools
import json

import pytest
import torch

import compress
from compress.arch import get_adapter
from compress.model.modeling_pruned import FactorizedLinear
from compress.ops.factorized import FactorStack, block_multiply, nowag_normalise
from compress.ops.masks import follows_nm, nm_mask
from tests.conftest import tiny_model, tiny_tokenizer
from tests.test_architectures import _logits, load_as_users_do


def _stack(seed=0, count=2, rows=8, cols=16, block=8, lr=1e-2):
    torch.manual_seed(seed)
    weights, h = torch.randn(count, rows, cols), torch.rand(count, cols) + 0.1
    wn = nowag_normalise(weights)[0]
    keep = nm_mask((wn.square() * h.unsqueeze(1)).reshape(-1, cols), 2, 4).reshape(weights.shape)
    return FactorStack(weights, h, keep, None, 2, 4, block, lr), weights, h


def test_block_multiply_is_the_block_diagonal_product():
    torch.manual_seed(1)
    left, core, right = torch.randn(3, 2, 4, 4), torch.randn(3, 8, 12), torch.randn(3, 3, 4, 4)
    dense = torch.stack([torch.block_diag(*left[i]) @ core[i] @ torch.block_diag(*right[i]) for i in range(3)])
    torch.testing.assert_close(block_multiply(left, core, right), dense)


def test_discrete_step_matches_brute_force_over_all_six_supports_and_never_raises_the_loss():
    stack, _, _ = _stack(rows=8, cols=8, block=8, count=1)  # one tile: exactly one group changes per step
    for step in range(12):
        stack.adam_step() if step else None  # move the factors between the checks
        error, per, dense_grad = stack.gradients()
        before_core = (stack.core * stack.keep).detach()[0].clone()
        before = float(stack.losses()[0])
        assert before == pytest.approx(float(per[0] / stack.scale[0]), rel=1e-5)
        after = float(stack.discrete_step(error, per, dense_grad, greedy=True)[0])
        changed = (stack.core * stack.keep).detach()[0] != before_core
        assert after <= before + 1e-7
        rows, groups = torch.nonzero(changed.reshape(8, 2, 4).any(-1), as_tuple=True)
        assert len(rows) <= 1
        if not len(rows):
            continue
        row, col = int(rows[0]), int(groups[0]) * 4
        best = float("inf")  # every support of 2 in the group, values by least squares over a fine search
        for support in itertools.combinations(range(4), 2):
            values = torch.zeros(2, requires_grad=True)
            optimizer = torch.optim.LBFGS([values], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

            def closure(support=support, values=values):
                optimizer.zero_grad()
                core = before_core.clone()
                core[row, col:col + 4] = 0
                core = core.index_put((torch.tensor([row, row]), torch.tensor(support) + col), values)
                error = (block_multiply(stack.left[0].detach(), core, stack.right[0].detach()) - stack.wn[0])
                loss = (error * stack.sqrt_h[0]).square().sum() / stack.scale[0]
                loss.backward()
                return loss

            optimizer.step(closure)
            best = min(best, float(closure().detach()))
        assert after == pytest.approx(best, rel=1e-4, abs=1e-7)
        assert after == pytest.approx(float(stack.losses()[0]), rel=1e-4, abs=1e-7)


def test_iterations_lower_the_proxy_loss_and_keep_exact_2_4():
    stack, _, _ = _stack(count=3, rows=16, cols=32, block=8)
    start = stack.losses()
    for step in range(40):
        error, per, dense_grad = stack.gradients()
        after = stack.discrete_step(error, per, dense_grad, torch.Generator().manual_seed(step))
        assert (after <= per / stack.scale + 1e-7).all() and (after >= 0).all()  # never raises the loss
        assert torch.allclose(after, stack.losses(), rtol=1e-4, atol=1e-7)
        stack.adam_step()
    assert (stack.losses() < 0.7 * start).all()
    assert (stack.keep.reshape(3, 16, 8, 4).sum(-1) == 2).all()


def test_full_hessian_loss_is_the_layerwise_reconstruction_error_and_descends():
    torch.manual_seed(3)
    weights, x = torch.randn(2, 8, 16), torch.randn(2, 200, 16) * torch.rand(16) + 0.3
    hessian = x.transpose(1, 2) @ x / 200
    keep = nm_mask(weights.abs().reshape(-1, 16), 2, 4).reshape(weights.shape)
    stack = FactorStack(weights, hessian.diagonal(dim1=1, dim2=2), keep, weights * keep, 2, 4, 8, 1e-2, hessian,
                        dampening=0.0)
    start = stack.losses()
    for _ in range(30):
        stack.iterate()
    left, core, right = stack.folded()
    approx = block_multiply(left, core, right)
    truth = ((weights - approx) @ x.transpose(1, 2)).square().sum((1, 2)) / (weights @ x.transpose(1, 2)).square().sum(
        (1, 2))
    torch.testing.assert_close(stack.losses(), truth, rtol=1e-3, atol=1e-6)
    assert (stack.losses() < 0.8 * start).all()
    assert torch.equal(stack.keep, keep)  # no discrete step with the full Hessian: the start's mask stays


def test_folded_factors_compute_the_factorized_weight():
    stack, _, _ = _stack()
    stack.iterate()
    left, core, right = stack.folded()
    linear = FactorizedLinear(16, 8, 8)
    with torch.no_grad():
        linear.weight.copy_(core[1]), linear.block_out.copy_(left[1]), linear.block_in.copy_(right[1])
    x = torch.randn(5, 16)
    expected = block_multiply(stack.left[1], stack.core * stack.keep, stack.right[1])[1] * (
        stack.c[1].unsqueeze(-1) * stack.r[1].unsqueeze(-2))
    torch.testing.assert_close(linear(x), x @ expected.detach().T, rtol=1e-4, atol=1e-5)


@pytest.fixture
def llama_dir(tmp_path):
    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _recipe(folder, text_files, output, **stage):
    return {"model": {"name": str(folder)},
            "calibration": {"path": str(text_files["calibration"]), "num_samples": 8, "seq_len": 32},
            "stages": [{"method": "armor", "block_size": 16, **stage}], "export": {"output": str(output)},
            "eval": {"ppl": 2, "text": str(text_files["test"]), "seq_len": 32}}


def test_iteration_zero_with_init_nowag_is_nowag_p(llama_dir, text_files, tmp_path):
    """NoWag-P by hand: h = 2 mean(x^2) of each input on the dense model over the recipe's calibration windows,
    keep the 2 largest Wn^2 h of every 4 inputs of a row, the weights unchanged on the mask."""
    from calibration.data import calibration_windows
    from compress.recipe import load_recipe

    recipe = _recipe(llama_dir, text_files, tmp_path / "out", init="nowag", iterations=0, hessian="diagonal",
                     inputs="dense")
    report = compress.run(recipe, progress=False, log=lambda _: None)
    source = tiny_model("llama")
    windows = calibration_windows(load_recipe(recipe).calibration, source, tiny_tokenizer())
    squares = {}

    def hook(module, args, name):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        total, count = squares.get(name, (0.0, 0))
        squares[name] = (total + x.square().sum(0), count + x.shape[0])

    handles = [module.register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n))
               for name, module in source.named_modules() if isinstance(module, torch.nn.Linear) and "layers" in name]
    with torch.no_grad():
        source(windows)
    for handle in handles:
        handle.remove()
    ours = get_adapter(compress.load(tmp_path / "out"))
    checked = 0
    for index, layer in enumerate(ours.layers()):
        for name, factorized in ours.decoder_linears(layer).items():
            assert isinstance(factorized, FactorizedLinear)
            dense = source.get_submodule(f"model.layers.{index}.{name}").weight.detach()
            total, count = squares[f"model.layers.{index}.{name}"]
            h = (2 * total / count).float()
            wn = nowag_normalise(dense)[0]
            keep = nm_mask(wn.square() * h, 2, 4)
            weight = block_multiply(factorized.block_out, factorized.weight, factorized.block_in).detach()
            assert torch.equal(weight != 0, keep), name
            torch.testing.assert_close(weight, dense * keep, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 3 * 7
    assert all(stack["iterations"] == 0 for stack in report["stages"][0]["stacks"].values())


def test_armor_exports_reload_with_the_same_logits_as_users_load_them(llama_dir, text_files, tmp_path):
    output = tmp_path / "out"
    report = compress.run(_recipe(llama_dir, text_files, output, iterations=20), progress=False, log=lambda _: None)
    details = report["stages"][0]
    assert report["export"]["format"] == "per_layer" and report["export"]["nm_pattern_verified"] == ["2:4"]
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    # q_proj 96x96 at block 16: 16 x (96 + 96) per linear
    assert details["stacks"]["self_attn.q_proj 96x96"]["block"] == 16
    assert all(stack["proxy_loss_end"] < stack["proxy_loss_start"] for stack in details["stacks"].values())
    config = json.loads((output / "config.json").read_text())
    assert config["compress_factorized"]["0"]["self_attn.q_proj"] == 16
    model = load_as_users_do(output, per_layer=True)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "FactorizedLinear"  # the shipped file's class
    torch.testing.assert_close(_logits(model), _logits(compress.load(output)))
    for layer in get_adapter(model).layers():
        for name, linear in get_adapter(model).decoder_linears(layer).items():
            assert follows_nm(linear.weight, 2, 4), name
    # semi_structured=True's gate sees the cores (the factors stay dense einsums)
    from compress.export.semi_structured import plan

    reasons = {decision.reason for decision in plan(compress.load(output), torch.float16)}
    assert "weight is not 2:4 sparse" not in reasons and reasons, reasons


def test_armor_refuses_what_it_cannot_do(llama_dir, text_files, tmp_path):
    with pytest.raises(compress.errors.UserError, match="put armor last"):
        recipe = _recipe(llama_dir, text_files, tmp_path / "a")
        recipe["stages"].append({"method": "lora", "data": {"path": str(text_files["calibration"])}})
        compress.run(recipe, progress=False, log=lambda _: None)
    with pytest.raises(compress.errors.UserError, match="block_size"):
        compress.run(_recipe(llama_dir, text_files, tmp_path / "b"), ["stages.0.block_size=36"],
                     progress=False, log=lambda _: None)
    with pytest.raises(compress.errors.UserError, match="N:M"):
        compress.run(_recipe(llama_dir, text_files, tmp_path / "c", pattern="unstructured"), progress=False,
                     log=lambda _: None)


def test_eval_at_records_a_quality_curve_whose_last_point_is_the_exported_model(llama_dir, text_files, tmp_path):
    report = compress.run(_recipe(llama_dir, text_files, tmp_path / "out", iterations=6, eval_at=[0, 3, 6]),
                          progress=False, log=lambda _: None)
    curve = report["stages"][0]["curve"]
    assert [point["iteration"] for point in curve] == [0, 3, 6]
    assert curve[0]["seconds"] <= curve[1]["seconds"] <= curve[2]["seconds"]
    assert curve[-1]["ppl"] == pytest.approx(report["ppl"]["pruned"], rel=1e-6)
    assert all(stack["iterations"] == 6 for stack in report["stages"][0]["stacks"].values())


def test_stack_layers_splits_the_stacks_and_the_export_still_reloads(llama_dir, text_files, tmp_path):
    report = compress.run(_recipe(llama_dir, text_files, tmp_path / "out", iterations=3, stack_layers=2),
                          progress=False, log=lambda _: None)
    stacks = report["stages"][0]["stacks"]
    assert {"self_attn.q_proj 96x96 layers 0-1", "self_attn.q_proj 96x96 layers 2-2"} <= set(stacks)
    assert sum(stack["linears"] for stack in stacks.values()) == 3 * 7
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4


def test_flap_before_armor_with_widths_rounded_to_the_block(llama_dir, text_files, tmp_path):
    recipe = _recipe(llama_dir, text_files, tmp_path / "out", iterations=3)
    recipe["stages"].insert(0, {"method": "flap", "sparsity": 0.3, "round_to": 16})
    report = compress.run(recipe, progress=False, log=lambda _: None)
    assert report["params"]["decoder_linear_after"] < report["params"]["decoder_linear_before"]
    assert report["export"]["nm_pattern_verified"] == ["2:4"] and report["export"]["reload_max_abs_logit_diff"] < 1e-4
    load_as_users_do(tmp_path / "out", per_layer=True)
    recipe["stages"][0]["round_to"] = 8  # widths the 16-blocks may not divide: refused before loading
    with pytest.raises(compress.errors.UserError, match="round_to=16"):
        compress.run(recipe, ["output=" + str(tmp_path / "refused")], progress=False, log=lambda _: None)
