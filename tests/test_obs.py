"""The OBS engine (compress.ops.obs) against brute force: least-squares removal, SparseGPT's sweep, the re-fit."""

import pytest
import torch

from compress.errors import NumericalError
from compress.ops.masks import follows_nm, nm_mask
from compress.ops.obs import damped, inverse_cholesky, prune_columns, refit_kept, remove_inputs


def problem(rows=6, cols=16, tokens=400, seed=0):
    """A weight and correlated inputs (so that compensation has something to exploit)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=generator, dtype=torch.float64) @ mixing + 0.5
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return weight, x, x.T @ x / tokens


def output_error(x, weight, new):
    return float(((x @ (new - weight).T) ** 2).mean())


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    """U^T U = (damped H)^-1 with U upper triangular, positive diagonal: the factor SparseGPT sweeps with
    (equal to the Cholesky of the explicit inverse, which it replaced for speed)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(300, 40, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 40, dtype=torch.float64)
    hessian = x.T @ x / 300
    upper, dead = inverse_cholesky(hessian, dampening=0.01)
    h, _ = damped(hessian, 0.01)
    assert not dead.any()
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(h), rtol=1e-10, atol=1e-12)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    torch.testing.assert_close(upper, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_remove_inputs_is_the_least_squares_optimum(seed):
    weight, x, hessian = problem(seed=seed)
    kept = torch.randperm(16, generator=torch.Generator().manual_seed(seed))[:9].sort().values
    new, shift = remove_inputs(weight, hessian, kept, dampening=0.0)
    brute = torch.linalg.lstsq(x[:, kept], x @ weight.T).solution.T  # min ||X W^T - X_K W_K^T||
    torch.testing.assert_close(new, brute, rtol=1e-7, atol=1e-8)
    assert shift is None


def sequential_reference(weight, hessian, keep):
    """Brute-force OBS, one weight at a time: when column i of a row is zeroed, the columns after i
    re-fit the row's output exactly (H of the free columns solved directly); earlier columns stay."""
    w = weight.clone()
    cols = w.shape[1]
    for row in range(w.shape[0]):
        for i in range(cols):
            if keep[row, i]:
                continue
            delta = -w[row, i]
            free = torch.arange(i + 1, cols)
            if len(free):
                w[row, free] -= torch.linalg.solve(hessian[free][:, free], hessian[free, i] * delta)
            w[row, i] = 0.0
    return w


@pytest.mark.parametrize("pattern,block", [(None, 4), (None, 128), ((2, 4), 8), ((4, 8), 16)])
def test_sparsegpt_sweep_equals_brute_force_obs(pattern, block):
    weight, x, hessian = problem()
    new, keep = prune_columns(weight, hessian, 0.5, pattern, block_size=block, dampening=0.01)
    reference = sequential_reference(weight, damped(hessian, 0.01)[0], keep)
    torch.testing.assert_close(new.double(), reference, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_every_nm_group_has_exactly_m_minus_n_zeros(n, m):
    weight, _x, hessian = problem(rows=12, cols=32)
    new, keep = prune_columns(weight, hessian, 1 - n / m, (n, m), block_size=8)
    groups = keep.reshape(12, 32 // m, m)
    assert bool((groups.sum(-1) == n).all())
    assert follows_nm(new, n, m)
    assert bool((new[~keep] == 0).all())


def test_unstructured_zeroes_the_share_of_each_stacked_matrix():
    weight, _x, hessian = problem(rows=10, cols=32)
    new, keep = prune_columns(weight, hessian, 0.5, None, block_size=8, segments=[6, 4])
    assert int((~keep[:6]).sum()) == 6 * 32 // 2 and int((~keep[6:]).sum()) == 4 * 32 // 2
    assert int((new == 0).sum()) == 10 * 16


def test_sparsity_zero_is_the_identity():
    weight, _x, hessian = problem()
    new, keep = prune_columns(weight.float(), hessian, 0.0)
    assert torch.equal(new, weight.float()) and bool(keep.all())


def test_sparsegpt_reconstructs_better_than_a_mask_alone():
    """The point of the updates: a lower output error than the same mask without them, and than Wanda's mask."""
    weight, x, hessian = problem(rows=8, cols=32, tokens=600)
    new, keep = prune_columns(weight, hessian, 0.5, (2, 4), block_size=8)
    wanda_keep = nm_mask(weight.abs() * x.pow(2).sum(0).sqrt(), 2, 4)
    sparsegpt = output_error(x, weight, new.double())
    assert sparsegpt < 0.7 * output_error(x, weight, weight * keep)
    assert sparsegpt < 0.7 * output_error(x, weight, weight * wanda_keep)


def test_dead_inputs_are_zeroed_and_a_hessian_beyond_repair_names_the_layer():
    weight, _x, hessian = problem(cols=8)
    hessian[3, :] = hessian[:, 3] = 0.0  # input 3 never fires
    new, _keep = prune_columns(weight, hessian, 0.25, None, block_size=4)
    assert bool((new[:, 3] == 0).all()) and torch.isfinite(new).all()
    with pytest.raises(NumericalError, match="layers.7.mlp.down_proj"):
        prune_columns(weight, -torch.eye(8, dtype=torch.float64), 0.5, name="layers.7.mlp.down_proj")


def test_remove_inputs_with_the_mean_gives_the_intercept_a_bias_absorbs():
    """On the covariance and the mean: the least-squares optimum with an intercept (FLAP's compensation)."""
    weight, x, _ = problem(seed=5)
    kept = torch.arange(0, 16, 2)
    covariance = torch.cov(x.T, correction=0)
    new, shift = remove_inputs(weight, covariance, kept, dampening=0.0, mean=x.mean(0))
    design = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=torch.float64)], 1)
    brute = torch.linalg.lstsq(design, x @ weight.T).solution.T  # [W_K' | bias]
    torch.testing.assert_close(new, brute[:, :-1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(shift, brute[:, -1], rtol=1e-6, atol=1e-7)


def row_optimum(original, hessian, keep):
    """Each row's exact optimum with its mask fixed: o_K + o_R H_RK H_KK^-1, zeros elsewhere."""
    out = torch.zeros_like(original)
    for row in range(original.shape[0]):
        kept, removed = keep[row], ~keep[row]
        h_kk = hessian[kept][:, kept]
        shift = torch.linalg.solve(h_kk, hessian[kept][:, removed] @ original[row, removed])
        out[row, kept] = original[row, kept] + shift
    return out


def row_errors(original, hessian, new):
    delta = new.double() - original
    return ((delta @ hessian) * delta).sum(1)


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_refit_reaches_each_rows_least_squares_optimum_and_never_hurts_a_row(pattern):
    weight, _x, hessian = problem(rows=8, cols=32, tokens=600, seed=1)
    swept, keep = prune_columns(weight, hessian, 0.5, pattern, block_size=8)
    h = damped(hessian, 0.01)[0]
    optimum = row_optimum(weight, h, keep)
    refit, errors = refit_kept(swept, weight, hessian, keep, iterations=16)  # 16 kept per row: exact in 16 steps
    torch.testing.assert_close(refit.double(), optimum, rtol=2e-3, atol=2e-3)
    assert bool((refit[~keep] == 0).all())
    few, few_errors = refit_kept(swept, weight, hessian, keep, iterations=3)
    for new in (refit, few):
        assert bool((row_errors(weight, h, new) <= row_errors(weight, h, swept) * (1 + 1e-5)).all())
    assert errors["after"] < few_errors["after"] < few_errors["before"] == pytest.approx(errors["before"])
    assert errors["after"] == pytest.approx(float(row_errors(weight, h, optimum).sum()), rel=1e-3)


def test_refit_with_no_iterations_is_the_identity():
    weight, _x, hessian = problem()
    swept, keep = prune_columns(weight, hessian, 0.5, None, block_size=4)
    same, errors = refit_kept(swept, weight, hessian, keep, iterations=0)
    assert torch.equal(same, swept) and errors["after"] == errors["before"]
