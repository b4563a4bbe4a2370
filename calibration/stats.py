"""Per-input-channel statistics of linear layers, accumulated in float64 from forward hooks."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from compress.errors import NonFiniteInput, NumericalError


class ChannelStats:
    """Running count, sum and sum of squares of each input channel of one linear.

    With `second_moment_stride`, the input's second-moment matrix sum(x x^T) is accumulated too,
    over every `stride`-th token (the covariance needs far fewer tokens than channels x 10 to be
    well estimated, and it is the one statistic whose cost grows with the width squared).
    """

    def __init__(self, name: str, width: int, second_moment_stride: int | None = None):
        self.name = name
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sum_sq = torch.zeros(width, dtype=torch.float64)
        self.stride = second_moment_stride
        # float32, updated in place (addmm_): each batch adds a few thousand tokens, and the
        # covariance is ridge-damped before use, so float32 accumulation is ample.
        self.gram = torch.zeros(width, width, dtype=torch.float32) if second_moment_stride else None
        self.gram_sum = torch.zeros(width, dtype=torch.float64) if second_moment_stride else None
        self.gram_count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype != torch.float32:
            x = x.float()
        tokens = x.shape[0]
        # Column sums are cheap vectorised reductions (torch.var_mean over dim 0 is ~8x slower).
        column_sum = x.sum(0)
        if not torch.isfinite(column_sum).all():  # NaN/Inf anywhere in x reaches its column sum
            raise NonFiniteInput(f"NaN or Inf in the input of {self.name}")
        self.count += tokens
        self.sum += column_sum.double().cpu()
        self.sum_sq += (x * x).sum(0).double().cpu()
        if self.gram is not None:
            sub = x[:: self.stride]
            self.gram_count += sub.shape[0]
            self.gram_sum += sub.sum(0).double().cpu()
            self.gram.addmm_(sub.T.cpu(), sub.cpu())

    def check_finite(self) -> None:
        if not (torch.isfinite(self.sum).all() and torch.isfinite(self.sum_sq).all()):
            raise NumericalError(f"NaN or Inf in the input of {self.name}")

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.count).float()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over all calibration tokens."""
        mean = self.sum / self.count
        return (self.sum_sq / self.count - mean * mean).clamp_min(0).float()

    @property
    def l2_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda's activation norm)."""
        return self.sum_sq.sqrt().float()

    def covariance(self) -> torch.Tensor:
        """Input covariance (float64) from the sub-sampled second moment."""
        if self.gram is None:
            raise RuntimeError(f"{self.name}: covariance was not collected")
        mean = self.gram_sum / self.gram_count
        return self.gram.double() / self.gram_count - torch.outer(mean, mean)


@contextmanager
def input_stats(modules: dict[str, nn.Linear], second_moment_stride: int | None = None, where: str = "",
                labels: dict[str, str] | None = None):
    """Collect ChannelStats of the inputs of `modules` while the block runs; hooks removed on exit.

    NaN/Inf messages name each module by `labels[key]` (default: its key) and `where` (e.g.
    "decoder layer 3").
    """
    labels = labels or {}
    stats = {name: ChannelStats(f"{labels.get(name, name)}{f' of {where}' if where else ''}", module.in_features,
                                second_moment_stride) for name, module in modules.items()}
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
