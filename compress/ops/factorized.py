"""N:M sparse cores wrapped in block-diagonal factors (ARMOR, Liu et al., ICLR 2026, arXiv 2510.05528).

A linear's weight W (out x in) is written W ~ diag(c) A (S * M) B diag(r): r and c are NoWag's column
then row norms, A and B block-diagonal (blocks of `block` x `block`), M an N:M mask, S its values.
`FactorStack` holds this for a stack of same-shape matrices (every q_proj of a model, say) and improves
all of them at once on the NoWag proxy loss

    L = sum_ij h_j (Wn_ij - [A (S*M) B]_ij)^2 / sum_ij h_j Wn_ij^2,      Wn = W / (c r^T),

with h_j = 2 mean(x_j^2) the diagonal of the layer-wise Hessian. One iteration is an Adam step on A, B
and S jointly, then the exact discrete step: in every (block x block) tile one group of M inputs of one
row (sampled with probability proportional to the L1 norm of the loss gradient on the dense core) gets
the best of its C(M, N) supports with least-squares values. The tile's other weights are fixed, groups in
different tiles do not interact (A and B are block-diagonal), the old support is a candidate: the step
never raises the loss. One forward and backward per iteration serve both steps: the discrete step works on
the exact residual of the current factors, then Adam applies the gradients taken there.

A factorized linear becomes `compress.model.modeling_pruned.FactorizedLinear` (the modelling file
shipped with the checkpoint holds it): y = A'(core(B' x)) + bias, A' = diag(c) A and B' = B diag(r)
folded, `weight` the N:M core.
"""

from __future__ import annotations

import itertools

import torch

from compress.model.modeling_pruned import FactorizedLinear  # noqa: F401  (the module it becomes)

EPS = 1e-5  # NoWag's epsilon on the norms


def nowag_normalise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Wn, r, c) with W = diag(c) Wn diag(r): column norms r first, then row norms c of W / r."""
    r = weight.norm(dim=-2) + EPS
    scaled = weight / r.unsqueeze(-2)
    c = scaled.norm(dim=-1) + EPS
    return scaled / c.unsqueeze(-1), r, c


def block_multiply(left: torch.Tensor | None, core: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """left @ core @ right for block-diagonal left [..., n_out, b, b] and right [..., n_in, b, b] (None = I)."""
    shape = core.shape
    out = core
    if left is not None:
        n, b = left.shape[-3], left.shape[-1]
        out = (left @ out.reshape(*shape[:-2], n, b, shape[-1])).reshape(shape)
    if right is not None:
        n, b = right.shape[-3], right.shape[-1]
        split = out.reshape(*shape[:-1], n, b).transpose(-3, -2)  # [..., n, out, b]
        out = (split @ right).transpose(-3, -2).reshape(shape)
    return out


class FactorStack:
    """Stacked same-shape matrices [L, out, in], each with its own factors, mask and values (see module doc)."""

    def __init__(self, weights: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, values: torch.Tensor | None,
                 n: int, m: int, block: int, learning_rate: float, hessian: torch.Tensor | None = None,
                 dampening: float = 0.01):
        """`weights` dense [L, out, in]; `h` [L, in]; `keep` the initial N:M mask; `values` the initial
        weights on it in the original space (None: the dense weights, NoWag-P's start).

        `hessian` [L, in, in] (E[x x^T]) replaces the diagonal proxy by the layer-wise reconstruction loss
        ||(W - W-hat) X||^2 / ||W X||^2 in the original space (`dampening` x mean diagonal added); the
        discrete step assumes the diagonal proxy and is not available with it."""
        count, rows, cols = weights.shape
        if rows % block or cols % block or block % m:
            raise ValueError(f"block {block} must divide {rows} and {cols} and be a multiple of M={m}")
        weights = weights.float()
        self.wn, self.r, self.c = nowag_normalise(weights)
        h = h.float().clone()
        bad = ~torch.isfinite(h) | (h <= 0)
        if bad.any():  # as the reference code: unusable entries take the mean of the valid ones
            valid = torch.where(bad, torch.zeros_like(h), h)
            h = torch.where(bad, valid.sum(-1, keepdim=True) / (~bad).sum(-1, keepdim=True).clamp_min(1), h)
        self.h, self.sqrt_h = h, h.sqrt()
        self.scale = (self.wn.square() * h.unsqueeze(-2)).sum((-2, -1))  # the loss at W-hat = 0
        self.n, self.m, self.block = n, m, block
        self.keep = keep.clone()
        start = self.wn if values is None else values.float() / (self.c.unsqueeze(-1) * self.r.unsqueeze(-2))
        self.core = (start * keep).requires_grad_(True)
        eye = torch.eye(block).expand(count, rows // block, block, block)
        self.left = eye.clone().requires_grad_(True)
        self.right = torch.eye(block).expand(count, cols // block, block, block).clone().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.left, self.core, self.right], lr=learning_rate, fused=True)
        self.supports = torch.tensor(list(itertools.combinations(range(m), n)))  # [C(M,N), N]
        self.active = torch.ones(count, dtype=torch.bool)
        self.whiten = None
        if hessian is not None:  # H~ = diag(r) H diag(r) = C C^T; rows weighted by c^2
            scaled = hessian.double() * (self.r.double().unsqueeze(-1) * self.r.double().unsqueeze(-2))
            diagonal = scaled.diagonal(dim1=-2, dim2=-1)
            scaled.diagonal(dim1=-2, dim2=-1).add_(dampening * diagonal.mean(-1, keepdim=True))
            self.whiten = torch.linalg.cholesky(scaled).float()
            self.row_scale = self.c.unsqueeze(-1)
            with torch.no_grad():  # the loss at W-hat = 0: ||W X||^2
                self.scale = self._error(self.wn * 0).square().sum((-2, -1))

    def _error(self, core: torch.Tensor) -> torch.Tensor:
        """The weighted residual whose squared sum is the loss: (A core B - Wn) sqrt(h), or with the full
        Hessian diag(c) (A core B - Wn) C."""
        error = block_multiply(self.left, core, self.right) - self.wn
        if self.whiten is None:
            return error * self.sqrt_h.unsqueeze(-2)
        return (error * self.row_scale) @ self.whiten

    def losses(self, core: torch.Tensor | None = None) -> torch.Tensor:
        """The proxy loss of every matrix [L] (at the current factors; `core` defaults to S * M)."""
        with torch.no_grad():
            core = self.core * self.keep if core is None else core
            return self._error(core).square().sum((-2, -1)) / self.scale

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward and backward at the current factors: (weighted residual [L, out, in], unnormalised loss [L],
        loss gradient on the dense core); the gradients of A, B and S are left for `adam_step`."""
        self.optimizer.zero_grad(set_to_none=True)
        core = (self.core * self.keep).detach().requires_grad_(True)
        error = self._error(core)
        per = error.square().sum((-2, -1))
        (per / self.scale).sum().backward()
        self.core.grad = core.grad * self.keep
        return error.detach(), per.detach(), core.grad

    def adam_step(self) -> None:
        """One Adam step of the active matrices with the gradients of `gradients`."""
        params = (self.left, self.core, self.right)
        frozen = ~self.active
        saved = [param.detach()[frozen].clone() for param in params] if frozen.any() else None
        self.optimizer.step()
        if saved is not None:  # Adam's momentum would move a stopped matrix: put it back
            with torch.no_grad():
                for param, value in zip(params, saved):
                    param[frozen] = value

    def iterate(self, generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        """One iteration: gradients, the discrete step on the exact residual, then Adam with those gradients
        (so one forward serves both). Returns the loss after the discrete step (full Hessian: no discrete step,
        the loss before Adam's step)."""
        error, per, dense_grad = self.gradients()
        if self.whiten is None:
            loss = self.discrete_step(error, per, dense_grad, generator, greedy)
        else:
            loss = per / self.scale
        self.adam_step()
        return loss

    @torch.no_grad()
    def discrete_step(self, error: torch.Tensor, per: torch.Tensor, dense_grad: torch.Tensor,
                      generator: torch.Generator | None = None, greedy: bool = False) -> torch.Tensor:
        """Re-choose one group per tile (module doc) from the residual `error` and unnormalised loss `per` of
        the current factors; returns the loss of every matrix after it."""
        count, rows, cols = self.wn.shape
        b, m = self.block, self.m
        n_out, n_in, per_tile = rows // b, cols // b, b // m
        score = dense_grad.abs().reshape(count, n_out, b, n_in, per_tile, m).sum(-1)
        score = score.permute(0, 1, 3, 2, 4).reshape(-1, b * per_tile)  # [tiles, groups of a tile]
        pick = score.argmax(-1) if greedy else torch.multinomial(score + 1e-30, 1, generator=generator).squeeze(-1)
        row_local, group_local = pick // per_tile, pick % per_tile
        tiles = torch.arange(score.shape[0])
        lidx, out_block, in_block = tiles // (n_out * n_in), (tiles // n_in) % n_out, tiles % n_in
        row = out_block * b + row_local
        cols_g = (in_block * b + group_local * m).unsqueeze(-1) + torch.arange(m)  # [T, M]
        where = (lidx.unsqueeze(-1), row.unsqueeze(-1), cols_g)
        # a^T R for every column a of A's blocks at once (one product), then each tile's row and columns
        projected_all = self.left.detach().transpose(-1, -2) @ error.reshape(count, n_out, b, cols)
        projected = projected_all.reshape(count, n_out, b, n_in, b)[lidx, out_block, row_local, in_block]  # [T, b]
        a = self.left.detach()[lidx, out_block, :, row_local]  # [T, b]
        norm_a = a.double().square().sum(-1, keepdim=True)
        offsets = (group_local * m).view(-1, 1, 1) + torch.arange(m).view(1, m, 1)
        bg = self.right.detach()[lidx, in_block].gather(1, offsets.expand(-1, -1, b))  # [T, M, b] rows of B
        bg = bg * self.sqrt_h.reshape(count, n_in, b)[lidx, in_block].unsqueeze(1)
        old = (self.core.detach() * self.keep)[where]  # [T, M]
        contribution = torch.einsum("tm,tmc->tc", old, bg)  # the group's row of the tile's output
        # the residual without the group: R - a c^T; its loss and its a^T R
        projected_without = projected.double() - norm_a * contribution.double()
        removed = 2 * (contribution.double() * projected.double()).sum(-1) - norm_a.squeeze(-1) * (
            contribution.double().square().sum(-1))
        g = torch.einsum("tmc,tc->tm", bg.double(), projected_without)  # [T, M]
        q = bg.double() @ bg.double().transpose(1, 2)  # [T, M, M]
        sup = self.supports
        q_p = q[:, sup.unsqueeze(-1), sup.unsqueeze(-2)] + 1e-9 * torch.eye(self.n, dtype=torch.float64)
        g_p = g[:, sup]  # [T, K, N]
        solved = torch.linalg.solve(q_p, g_p.unsqueeze(-1)).squeeze(-1)  # Q^-1 g per support
        gain = (g_p * solved).sum(-1) / (norm_a + 1e-8)  # [T, K]: loss decrease from the empty group
        best = gain.argmax(-1)
        active = self.active[lidx]
        keep_new = torch.zeros(len(tiles), m, dtype=torch.bool)
        keep_new[tiles.unsqueeze(-1), sup[best]] = True
        values = torch.zeros(len(tiles), m)
        values[tiles.unsqueeze(-1), sup[best]] = (-solved[tiles, best] / (norm_a + 1e-8)).float()
        self.keep[where] = torch.where(active.unsqueeze(-1), keep_new, self.keep[where])
        self.core.data[where] = torch.where(active.unsqueeze(-1), values, old)
        change = torch.where(active, removed + gain[tiles, best], torch.zeros_like(removed))  # loss decrease
        after = per.double() - torch.zeros(count, dtype=torch.float64).index_add_(0, lidx, change)
        return (after / self.scale).float()

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A' = diag(c) A [L, n_out, b, b], core S*M [L, out, in], B' = B diag(r) [L, n_in, b, b])."""
        count, rows, cols = self.wn.shape
        b = self.block
        left = self.left * self.c.reshape(count, rows // b, b, 1)
        right = self.right * self.r.reshape(count, cols // b, 1, b)
        return left.detach().clone(), (self.core * self.keep).detach().clone(), right.detach().clone()
