"""Optimal brain surgeon (OBS) on a linear's input Hessian: the one engine of every method that compensates.

A linear y = W x with calibration inputs x has the layer-wise reconstruction error
||(W' - W) X||^2 = tr((W' - W) H (W' - W)^T) with H = E[x x^T] (the Hessian up to a factor 2N).
These operations solve it, in float64 where it matters:

* `remove_inputs`: drop a set R of input columns (structured pruning of channels or heads) and re-fit the
  kept columns K by least squares, W_K' = W_K + W_R H_RK H_KK^-1. This is OBS removing all of R at
  once (-W_R [H^-1]_RR^-1 [H^-1]_R,: equals the same update), and it is FLAP's least-squares
  compensation when H is the covariance and the intercept goes to the bias.
* `removal_order`: greedy OBS removal of whole input units (channels, or the columns of a KV group),
  a few units a round, each round taking the units whose removal with the optimal update of the
  rest costs least and applying that update (Týr's local pruner; the candidates it yields are then
  re-fit exactly by `remove_inputs`).
* `prune_columns` (SparseGPT, Frantar & Alistarh, ICML 2023, arXiv 2301.00774): zero single weights
  column by column; each zeroed weight's error is spread over the columns not yet visited by the OBS
  update with the upper Cholesky factor U of H^-1 (row i of U is H^-1 of the remaining columns,
  divided by the square root of its pivot). Columns go in blocks with lazy batch updates (and, inside
  a block, 16-column sub-blocks with a GEMM between them: the same sums in another order); the mask is
  chosen inside each block from w^2 / U_ii^2 (unstructured: the lowest `sparsity` of the block, per row
  segment; N:M: the M - N lowest of every M inputs of each row).
* `refit_kept`: with the mask fixed, re-fit each row's kept weights to the dense outputs (preconditioned
  conjugate gradients on the same error), closing the part of the optimum the one-pass sweep misses.

Dampening: `dampening` x mean(diag H) is added to the diagonal (inputs that never fire get H_jj = 1
and their weights zeroed, as nothing in the calibration constrains them). If H is still not positive
definite, the dampening is raised tenfold up to three times, then a `NumericalError` names the layer.
"""

from __future__ import annotations

import torch

from compress.errors import NumericalError

RETRIES = 3
SUB_BLOCK = 16  # columns swept between GEMM updates of the rest of a block (exact: only the order of sums)


def damped(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copy of H with dead inputs (H_jj = 0) set to 1 and `dampening` x mean(diag) added; the dead mask."""
    h = hessian.detach().to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    return h, dead


def _cholesky(h: torch.Tensor, dampening: float, name: str, upper: bool = False) -> torch.Tensor:
    base = h.diagonal().mean()
    extra = dampening
    for attempt in range(RETRIES + 1):
        factor, info = torch.linalg.cholesky_ex(h, upper=upper)
        if int(info) == 0:
            return factor
        if attempt < RETRIES:
            h = h.clone()
            h.diagonal().add_(9 * extra * base)  # dampening x 10, then x 100, x 1000
            extra *= 10
    raise NumericalError(f"the input Hessian of {name} is not positive definite even with dampening {extra:g} x "
                         f"its mean diagonal (inputs nearly collinear or too few calibration tokens); "
                         f"use more calibration samples or a larger dampening")


def inverse_cholesky(hessian: torch.Tensor, dampening: float = 0.01, name: str = "a linear"):
    """Upper Cholesky factor U of (damped H)^-1 (U^T U = H^-1), float64, and the dead-input mask.

    With J the reversal of the inputs' order, J H J = M M^T (M lower triangular) gives
    H^-1 = J M^-T M^-1 J = U^T U for U = J M^-1 J, which is upper triangular with a positive diagonal:
    the Cholesky factor of H^-1 itself (it is unique). One Cholesky and one triangular solve instead of
    a Cholesky, torch's `cholesky_inverse` and a second Cholesky that could fail on rounding: 1.38 s
    instead of 1.98 s at width 4,096 and 10.9 s instead of 14.3 s at 8,192 (2 idle CPU cores). At most
    two float64 copies of H are alive at once (for a 28,672-wide input: 2 x 6.6 GB)."""
    h, dead = damped(hessian, dampening)
    flipped = h.flip(0, 1)
    del h
    lower = _cholesky(flipped, dampening, name)
    del flipped
    inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
    del lower
    return inverse.flip(0, 1), dead


def remove_inputs(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, dampening: float = 0.01,
                  name: str = "a linear", mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The least-squares optimum of the kept columns after the others are removed (float64).

    Returns W_K' [out, kept] = W_K + W_R A with A = H_RK (H_KK + lambda I)^-1, lambda = `dampening` x
    mean(diag H_KK): removed inputs are replaced by their best linear prediction from the kept ones.
    With the inputs' `mean` (H then their covariance), also the intercept's output shift
    W_R (mean_R - A mean_K), which a bias absorbs; else None.
    """
    h = hessian.detach().double()
    removed_mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    kept = kept.to(h.device)
    removed_mask[kept] = False
    h_kk = h[kept][:, kept]
    ridge = dampening * h_kk.diagonal().mean().clamp_min(1e-12)
    h_kk = h_kk + ridge * torch.eye(len(kept), dtype=torch.float64, device=h.device)
    lower = _cholesky(h_kk, dampening, name)
    predictor = torch.cholesky_solve(h[kept][:, removed_mask], lower).T  # A [removed, kept]
    w = weight.detach().to(device=h.device, dtype=torch.float64)
    w_removed = w[:, removed_mask]
    shift = None
    if mean is not None:
        mean = mean.to(device=h.device, dtype=torch.float64)
        shift = w_removed @ (mean[removed_mask] - predictor @ mean[kept])
    return w[:, kept] + w_removed @ predictor, shift


@torch.no_grad()
def removal_order(weight: torch.Tensor, hessian: torch.Tensor, units: torch.Tensor, count: int, per_round: int = 1,
                  dampening: float = 0.01, name: str = "a linear") -> list[int]:
    """The first `count` units (rows of `units` [U, w]: input-column indices) in the order greedy OBS
    removes them from the linear, cheapest first.

    A round costs each remaining unit u at tr(W_u [H^-1]_uu^-1 W_u^T) (the error of removing it with
    the optimal update of the other columns; ||W_j||^2 / [H^-1]_jj for one channel), removes the
    `per_round` cheapest together, and updates W -= W_P [H^-1]_PP^-1 [H^-1]_P: and
    H^-1 -= [H^-1]_:P [H^-1]_PP^-1 [H^-1]_P:, so later rounds see the compensated weight. Inputs that
    never vary (H_jj = 0) cost nothing: the intercept absorbs them.
    """
    h, dead = damped(hessian, dampening)
    hinv = torch.cholesky_inverse(_cholesky(h, dampening, name))
    del h
    w = weight.detach().to(device=hinv.device, dtype=torch.float64, copy=True)
    w[:, dead] = 0
    units = units.to(hinv.device)
    remaining = torch.ones(units.shape[0], dtype=torch.bool, device=hinv.device)
    order: list[int] = []
    while len(order) < count:
        candidates = remaining.nonzero().flatten()
        index = units[candidates]  # [R, w]
        blocks = hinv[index[:, :, None], index[:, None, :]]  # [R, w, w]
        wu = w[:, index].permute(1, 2, 0)  # [R, w, out]
        if index.shape[1] == 1:
            cost = wu[:, 0].pow(2).sum(1) / blocks[:, 0, 0]
        else:
            # the blocks are principal submatrices of the positive definite H^-1: Cholesky, never LU
            # (torch 2.13's batched LU on CPU fails on blocks wider than 128 once set_num_threads ran)
            cost = (wu * torch.cholesky_solve(wu, torch.linalg.cholesky(blocks))).sum((1, 2))
        take = min(per_round, count - len(order))
        picked = candidates[torch.topk(cost, take, largest=False).indices.sort().values]
        columns = units[picked].reshape(-1)
        coefficients = torch.cholesky_solve(hinv[columns], torch.linalg.cholesky(hinv[columns][:, columns]))
        w -= w[:, columns] @ coefficients
        hinv -= hinv[:, columns] @ coefficients
        remaining[picked] = False
        order.extend(picked.tolist())
    return order


def _block_mask(scores: torch.Tensor, sparsity: float, segments: list[int]) -> torch.Tensor:
    """Prune-mask (True = zero) of the lowest `sparsity` of each row segment of a column block."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    start = 0
    for rows in segments:
        part = scores[start:start + rows]
        count = int(part.numel() * sparsity)
        if count:
            flat = torch.zeros(part.numel(), dtype=torch.bool, device=scores.device)
            flat[torch.topk(part.reshape(-1), count, largest=False).indices] = True
            mask[start:start + rows] = flat.reshape(part.shape)
        start += rows
    return mask


@torch.no_grad()
def prune_columns(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                  block_size: int = 128, dampening: float = 0.01, segments: list[int] | None = None,
                  name: str = "a linear") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight matrix (or several stacked row-wise that read the same input).

    `segments` = row counts of the stacked matrices: an unstructured block's mask is chosen within
    each, as if pruned alone. Returns (new weight float32 [rows, cols], keep-mask). Sparsity 0 and no
    pattern returns the weight unchanged.
    """
    rows, cols = weight.shape
    segments = segments or [rows]
    if sparsity == 0 and nm is None:
        return weight.detach().float().clone(), torch.ones(rows, cols, dtype=torch.bool, device=weight.device)
    if nm is not None and cols % nm[1]:
        raise NumericalError(f"{name}: N:M needs M ({nm[1]}) to divide the input width {cols}")
    device = hessian.device
    upper, dead = inverse_cholesky(hessian, dampening, name)
    u = upper.float()
    w = weight.detach().to(device=device, dtype=torch.float32, copy=True)
    w[:, dead] = 0
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    n, m = nm if nm is not None else (0, 0)
    # sub-blocks hold whole N:M groups, so each group's mask is chosen on fully updated columns
    step = -(-SUB_BLOCK // m) * m if nm is not None else SUB_BLOCK
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        u_block = u[start:end, start:end]
        pivots = u_block.diagonal()
        errors = torch.zeros_like(block)
        if nm is None:
            block_pruned = _block_mask(block.pow(2) / pivots.pow(2), sparsity, segments)
        else:
            block_pruned = torch.zeros_like(block, dtype=torch.bool)
        width = end - start
        for sub in range(0, width, step):  # the same lazy update one level down: a GEMM per sub-block
            sub_end = min(sub + step, width)
            for i in range(sub, sub_end):
                if nm is not None and i % m == 0:
                    group = block[:, i:i + m].pow(2) / pivots[i:i + m].pow(2)
                    block_pruned[:, i:i + m].scatter_(1, torch.topk(group, m - n, dim=1, largest=False).indices,
                                                      True)
                column = block[:, i]
                kept = torch.where(block_pruned[:, i], 0.0, column)
                error = (column - kept) / pivots[i]
                block[:, i:sub_end].addr_(error, u_block[i, i:sub_end], alpha=-1)
                block[:, i] = kept  # exactly zero where pruned
                errors[:, i] = error
            if sub_end < width:
                block[:, sub_end:].sub_(errors[:, sub:sub_end] @ u_block[sub:sub_end, sub_end:])
        w[:, start:end] = block
        pruned[:, start:end] = block_pruned
        if end < cols:
            w[:, end:].sub_(errors @ u[start:end, end:])
    keep = ~pruned
    w[pruned] = 0
    if not torch.isfinite(w).all():
        raise NumericalError(f"SparseGPT's update of {name} produced NaN or Inf; raise the dampening")
    return w, keep


@torch.no_grad()
def refit_kept(weight: torch.Tensor, original: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
               iterations: int = 20, dampening: float = 0.01) -> tuple[torch.Tensor, dict[str, float]]:
    """Re-fit the kept weights of a pruned linear to the dense one's outputs, the mask fixed.

    Each row r solves min over its kept entries of (w_r - o_r) H (w_r - o_r)^T (o = `original`, the
    dense weight; H damped as in `prune_columns`), whose optimum is o_K + o_R H_RK H_KK^-1 per row.
    SparseGPT's one sweep reaches it only approximately (each column's update sees the mask of the
    columns after it not yet chosen); `iterations` steps of conjugate gradients, preconditioned by
    diag(H) and run on all rows at once (one [rows x cols] x [cols x cols] product a step), close most
    of the gap. A row whose error would grow (rounding in a tiny residual) keeps its input weights.
    Returns (new weight float32, {"before", "after"}: the summed error of all rows).
    """
    h, dead = damped(hessian, dampening)
    h32 = h.float()
    device = h32.device
    mask = keep.to(device) & ~dead[None, :]
    start = weight.detach().to(device=device, dtype=torch.float32) * mask
    target = original.detach().to(device=device, dtype=torch.float32)

    def row_error(w: torch.Tensor) -> torch.Tensor:
        delta = (w - target).double()
        return ((delta @ h) * delta).sum(1)

    before = row_error(start)
    if iterations <= 0:
        total = float(before.sum())
        return start, {"before": total, "after": total}
    diagonal = h32.diagonal()[None, :]
    w = start.clone()
    residual = ((target - w) @ h32) * mask
    z = residual / diagonal
    direction = z.clone()
    rz = (residual * z).sum(1)
    for _ in range(iterations):
        product = (direction @ h32) * mask
        curvature = (direction * product).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        w.add_(alpha[:, None] * direction)
        residual.sub_(alpha[:, None] * product)
        z = residual / diagonal
        rz_next = (residual * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        direction = z + beta[:, None] * direction
        rz = rz_next
    after = row_error(w)
    worse = ~(after <= before)  # also NaN
    w[worse] = start[worse]
    after = torch.where(worse, before, after)
    return w, {"before": float(before.sum()), "after": float(after.sum())}
