"""Per-input-channel statistics of linear layers: shifted moments accumulated in float64 from forward hooks."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from compress.errors import NonFiniteInput, NumericalError

FLUSH_EVERY = 8  # batches of float32 products summed before they join the float64 second moment
STRIP = 384  # rows of one strip of the second-moment product (upper triangle only, strip by strip)


class ChannelStats:
    """Running count and shifted moments of each input channel of one linear.

    Every moment is taken about a shift, the first batch's column means, and accumulated across
    batches in float64 on the activation's device (each batch's reduction runs in float32 on data
    that is already centred to within a batch's spread): E[x^2] - mean^2 of large-mean channels
    then keeps its digits (a channel at mean 300 and std 0.05 has variance 0.0025, not 0.0). Mean,
    variance and ||X_j|| all derive from the same three sums. Column sums are matrix-vector
    products (ten times faster than `sum(0)` on CPU).

    With `second_moment_stride`, the input's second-moment matrix is accumulated too (about the same
    shift), over every `stride`-th token: the covariance for least squares, and E[x x^T] (the
    Hessian of the layer-wise reconstruction error, up to a factor) for SparseGPT's updates. It is
    the one statistic whose cost grows with the width squared: width^2 x 8 bytes. At stride 1 its
    diagonal is the sum of squares, which is then not computed twice.
    """

    def __init__(self, name: str, width: int, second_moment_stride: int | None = None, scratch: dict | None = None):
        self.name = name
        self.width = width
        self.count = 0
        self.stride = second_moment_stride
        self.gram_count = 0
        self.shift = None  # first batch's column means (float32), set by the first update
        self._sum = self._sum_sq = self._gram = self.gram_sum = None
        self._pending, self._pending_batches = None, 0  # float32 products not yet in the float64 sum
        self._pending_upper = False  # the pending product holds its upper triangle only (strips)
        self._mirrored = True  # the float64 sum's lower triangle is up to date
        # vectors of ones for the column sums, shared by one layer's statistics (`input_stats`)
        self._scratch = scratch if scratch is not None else {}

    def _ones(self, tokens: int, device) -> torch.Tensor:
        key = (tokens, device)
        if key not in self._scratch:
            self._scratch[key] = torch.ones(tokens, device=device)
        return self._scratch[key]

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        tokens = x.shape[0]
        if tokens == 0:
            return
        ones = self._ones(tokens, x.device)
        column_sum = ones @ x
        if not torch.isfinite(column_sum).all():  # NaN/Inf anywhere in x reaches its column sum
            raise NonFiniteInput(f"NaN or Inf in the input of {self.name}")
        if self.shift is None:
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
            self.shift = column_sum / tokens
            self._sum, self._sum_sq = zeros(self.width), zeros(self.width)
            if self.stride:
                self._gram, self.gram_sum = zeros(self.width, self.width), zeros(self.width)
        self.count += tokens
        centred = x - self.shift
        centred_sum = ones @ centred  # not column_sum - tokens * shift, which cancels
        self._sum += centred_sum
        if self.stride:
            sub = centred if self.stride == 1 else centred[:: self.stride].contiguous()
            self._accumulate_product(sub)
            self._pending_batches += 1
            if self._pending_batches >= FLUSH_EVERY:
                self._flush()
            self.gram_count += sub.shape[0]
            self.gram_sum += centred_sum if self.stride == 1 else self._ones(sub.shape[0], x.device) @ sub
        if self.stride != 1:  # at stride 1 the product's diagonal is the sum of squares
            self._sum_sq += ones @ (centred * centred)

    def _accumulate_product(self, sub: torch.Tensor) -> None:
        """pending += sub^T sub (float32), upper triangle only once the width exceeds one strip: strips
        of STRIP rows, each times the columns from its own diagonal on (1,536 wide: 62% of the work,
        twice as fast as a full product on 2 cores; 28,672 wide: 51%)."""
        width = self.width
        if self._pending is None:
            self._pending = torch.zeros(width, width, device=sub.device)
        if width <= STRIP:
            self._pending.addmm_(sub.T, sub)
            return
        self._pending_upper = True
        for start in range(0, width, STRIP):
            stop = min(start + STRIP, width)
            self._pending[start:stop, start:].addmm_(sub[:, start:stop].T, sub[:, start:])

    def _flush(self) -> None:
        """Fold the float32 products of the last few batches into the float64 sum (a float64 add per batch
        costs a quarter of the product's time on CPU; a few batches of centred data lose nothing).

        With strips only the upper triangle is summed (one in-place add; what lands below the diagonal
        is overwritten): `gram` mirrors it once when read, not at every fold (the mirror at each fold
        cost 16 s of a 278 s SparseGPT run; the sums, element by element, are the same)."""
        if self._pending_batches:
            self._gram += self._pending
            self._pending.zero_()
            self._pending_batches = 0
            self._mirrored = not self._pending_upper

    def _mirror(self) -> None:
        """Copy the float64 sum's upper triangle onto its lower one, strip by strip (no full-size temporary)."""
        gram = self._gram
        for start in range(0, self.width, STRIP):
            stop = min(start + STRIP, self.width)
            block = gram[start:stop, start:stop]
            block.copy_(block.triu() + block.triu(1).T)
            gram[stop:, start:stop] = gram[start:stop, stop:].T
        self._mirrored = True

    @property
    def shifted_sum(self) -> torch.Tensor:
        """sum of (x - shift) per channel (float64, on the activation device)."""
        return self._sum

    @property
    def shifted_sum_sq(self) -> torch.Tensor:
        """sum of (x - shift)^2 per channel (float64, on the activation device)."""
        if self.stride == 1:
            self._flush()
            return self._gram.diagonal()
        return self._sum_sq

    @property
    def gram(self) -> torch.Tensor | None:
        """sum over the sub-sampled tokens of (x - shift)(x - shift)^T (float64)."""
        if self._gram is not None:
            self._flush()
            if not self._mirrored:
                self._mirror()
        return self._gram

    def check_finite(self) -> None:
        if self.count and not (torch.isfinite(self.shifted_sum).all() and torch.isfinite(self.shifted_sum_sq).all()):
            raise NumericalError(f"NaN or Inf in the input of {self.name}")

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(self.width)

    @property
    def sum(self) -> torch.Tensor:
        """Column sums (float64, on the activation device)."""
        return self.shifted_sum + self.count * self.shift.double()

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.count).float().cpu() if self.count else self._zeros()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over all calibration tokens."""
        if not self.count:
            return self._zeros()
        offset = self.shifted_sum / self.count
        return (self.shifted_sum_sq / self.count - offset * offset).clamp_min(0).float().cpu()

    @property
    def l2_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's activation norm): sum x^2 = sum c^2 + 2 s sum c + n s^2."""
        if not self.count:
            return self._zeros()
        shift = self.shift.double()
        sum_sq = self.shifted_sum_sq + 2 * shift * self.shifted_sum + self.count * shift * shift
        return sum_sq.clamp_min(0).sqrt().float().cpu()

    def _gram_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.stride:
            raise RuntimeError(f"{self.name}: the second moment was not collected")
        if not self.gram_count:
            raise RuntimeError(f"{self.name}: no calibration token reached this input")
        offset = self.gram_sum / self.gram_count  # mean of the sub-sampled tokens, about the shift
        return self.gram / self.gram_count - torch.outer(offset, offset), offset

    def covariance(self) -> torch.Tensor:
        """Input covariance (float64, on the activation device) from the sub-sampled second moment."""
        return self._gram_parts()[0]

    def second_moment(self) -> torch.Tensor:
        """E[x x^T] (float64, on the activation device): the layer-wise Hessian, up to a factor 2."""
        covariance, offset = self._gram_parts()
        mean = offset + self.shift.double()
        return covariance + torch.outer(mean, mean)


@contextmanager
def input_stats(modules: dict[str, nn.Linear], second_moment_stride: int | None = None, where: str = "",
                labels: dict[str, str] | None = None):
    """Collect ChannelStats of the inputs of `modules` while the block runs; hooks removed on exit.

    NaN/Inf messages name each module by `labels[key]` (default: its key) and `where` (e.g.
    "decoder layer 3").
    """
    labels = labels or {}
    scratch: dict = {}  # vectors of ones, shared
    stats = {name: ChannelStats(f"{labels.get(name, name)}{f' of {where}' if where else ''}", module.in_features,
                                second_moment_stride, scratch) for name, module in modules.items()}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0]))
        for name, module in modules.items()
    ]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
    for layer_stats in stats.values():
        layer_stats.check_finite()


@contextmanager
def angular_distance(layer: nn.Module):
    """Mean angular distance arccos(cos(h_in, h_out)) / pi over all tokens the layer sees while active.

    Yields a dict that holds `angular_distance` (in [0, 1]) once the block exits: how much the layer
    turns the residual stream (CFSP's and ShortGPT's block importance).
    """
    total = torch.zeros((), dtype=torch.float64)
    count = [0]

    def hook(_module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, (tuple, list)) else output
        cosine = torch.nn.functional.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1, eps=1e-8)
        angle = torch.arccos(cosine.clamp(-1.0, 1.0)) / torch.pi
        nonlocal total
        total = total + angle.double().sum().cpu()
        count[0] += angle.numel()

    result: dict[str, float] = {}
    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield result
    finally:
        handle.remove()
    if count[0]:
        result["angular_distance"] = float(total / count[0])


def measure_block_importance(capture) -> list[float]:
    """Angular distance of every decoder layer of the model as it is now, over one pass of `capture`
    (a LayerwiseCapture with one pass)."""
    distances = []
    for index, layer in capture.layers():
        with angular_distance(layer) as block:
            capture.forward(index, layer, advance=True)
        distances.append(block["angular_distance"])
    return distances
