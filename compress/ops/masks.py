"""Weight masks shared by every weight-level method: unstructured and N:M, applied in place.

A mask is a boolean tensor of a linear's weight shape, True = keep. Scores are higher-is-better.

* Unstructured: within each comparison group the lowest-scored `sparsity` fraction is zeroed. The
  group is one output row (`group: row`, Wanda's choice, better for LLMs) or the whole matrix
  (`group: layer`, classic magnitude pruning).
* N:M: in every block of M consecutive inputs of every row, the N best weights are kept
  (2:4 = two non-zeros in every four; the sparsity is 1 - N/M).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from compress.errors import UserError


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise UserError(f"sparsity pattern '{pattern}' is neither 'unstructured' nor 'N:M' (e.g. 2:4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise UserError(f"pattern {n}:{m} needs 0 < N < M (N weights kept in every M)")
    return n, m


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep-mask zeroing the lowest `sparsity` of each row (`row`) or of the whole matrix (`layer`)."""
    if group == "layer":
        count = int(scores.numel() * sparsity)
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        if count:
            keep[torch.topk(scores.reshape(-1), count, largest=False).indices] = False
        return keep.reshape(scores.shape)
    count = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count:  # a stable sort: on ties the earlier input goes first, as in the reference codes
        keep.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :count], False)
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the N best of every M consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"N:M pattern needs M ({m}) to divide the input width {cols}")
    blocks = scores.reshape(rows, cols // m, m)
    # Zero the M - N lowest (rather than keep the N highest): the two differ only on ties, which
    # quantized checkpoints have in plenty, and this is the reference codes' choice.
    keep = torch.ones_like(blocks, dtype=torch.bool)
    keep.scatter_(2, torch.topk(blocks, m - n, dim=2, largest=False).indices, False)
    return keep.reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured", group: str = "row") -> torch.Tensor:
    nm = parse_pattern(pattern)
    return unstructured_mask(scores, sparsity, group) if nm is None else nm_mask(scores, *nm)


@torch.no_grad()
def apply_mask(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight.mul_(keep.to(device=linear.weight.device, dtype=linear.weight.dtype))


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every block of M consecutive inputs of every row has at most N non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


class MaskSnapshot:
    """The zeros of every decoder linear before a dense update (e.g. a LoRA merge), to put back after it.

    `restore()` re-applies them and verifies that each N:M pattern still holds, except on the linears
    in `exempt` (left untouched by the stage that imposed the pattern).
    """

    def __init__(self, adapter, patterns: list[tuple[int, int]], exempt: set[str] = frozenset()):
        self.linears = {f"layers.{i}.{name}": linear for i, layer in enumerate(adapter.layers())
                        for name, linear in adapter.decoder_linears(layer).items()}
        self.masks = {key: linear.weight != 0 for key, linear in self.linears.items()}
        self.patterns, self.exempt = list(patterns), set(exempt)

    def restore(self) -> list[str]:
        """Re-apply the masks; returns the verified patterns as 'N:M' strings."""
        with torch.no_grad():
            for key, linear in self.linears.items():
                linear.weight.mul_(self.masks[key].to(linear.weight.dtype))
        for key, linear in self.linears.items():
            if key in self.exempt:
                continue
            for n, m in self.patterns:
                if not follows_nm(linear.weight, n, m):
                    raise RuntimeError(f"{key} lost its {n}:{m} pattern after recovery")
        return [f"{n}:{m}" for n, m in self.patterns]
