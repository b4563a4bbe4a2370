"""Run 2:4 checkpoints on sparse tensor cores: `compress.load(path, semi_structured=True)`.

A 2:4 checkpoint is stored dense, zeros in place (every runtime loads it). On an NVIDIA GPU of
compute capability 8.0 or newer (A100, H100, RTX 30xx/40xx), PyTorch's
`torch.sparse.to_sparse_semi_structured` keeps only the non-zeros plus a small index and runs the
matmul on the sparse tensor cores. This module decides which linears can be converted (the
gate, testable anywhere) and converts them (CUDA only).

A linear is converted when its weight
* follows 2:4 exactly along the input dimension (at most 2 non-zeros in every 4),
* has a dtype the sparse kernels take (float16, bfloat16, int8, float32 for CUTLASS),
* has rows and columns that are multiples of the kernel's minimum tile for that dtype.
Every other linear stays dense, with the reason reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.arch import get_adapter
from compress.arch.moe import ExpertLinear
from compress.errors import UserError
from compress.ops.masks import follows_nm


@dataclass
class Decision:
    name: str
    convert: bool
    reason: str


def shape_constraints() -> dict:
    """Minimum (rows, cols) multiples per dtype, from the installed PyTorch's CUTLASS backend."""
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    return {dtype: (c.sparse_min_rows, c.sparse_min_cols)
            for dtype, c in SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS.items()}


def plan(model: nn.Module, dtype: torch.dtype | None = None) -> list[Decision]:
    """Which decoder linears can become semi-structured, and why not for the others.

    `dtype`: the dtype the weights will have when converted (default: their current dtype).
    """

    adapter = get_adapter(model)
    limits = shape_constraints()
    decisions = []
    for index, layer in enumerate(adapter.layers()):
        for name, linear in adapter.decoder_linears(layer).items():
            key = f"layers.{index}.{name}"
            weight = linear.weight
            target = dtype or weight.dtype
            rows, cols = weight.shape
            if isinstance(linear, ExpertLinear):
                # a view into a fused 3-D expert tensor: it has no weight of its own to replace
                decisions.append(Decision(key, False, "mixture-of-experts expert (fused tensor; runs dense)"))
            elif target not in limits:
                decisions.append(Decision(key, False, f"dtype {target} has no 2:4 kernel"))
            elif not follows_nm(weight, 2, 4):
                decisions.append(Decision(key, False, "weight is not 2:4 sparse"))
            elif rows % limits[target][0] or cols % limits[target][1]:
                decisions.append(Decision(key, False, f"shape {rows}x{cols} is not a multiple of "
                                                      f"{limits[target][0]}x{limits[target][1]} for {target}"))
            else:
                decisions.append(Decision(key, True, "2:4"))
    return decisions


def require_sparse_gpu() -> torch.device:
    """The CUDA device to use, or a UserError saying why 2:4 kernels are not available here."""
    if not torch.cuda.is_available():
        raise UserError("semi_structured=True needs an NVIDIA GPU with compute capability >= 8.0 (no CUDA device "
                        "here); load without it: the checkpoint is dense with zeros in place and runs anywhere")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise UserError(f"semi_structured=True needs compute capability >= 8.0; this GPU has {major}.{minor}. "
                        f"Load without it (dense with zeros in place)")
    return torch.device("cuda")


def convert(model: nn.Module, dtype: torch.dtype = torch.float16) -> list[Decision]:
    """Move `model` to the GPU in `dtype` and convert every eligible linear; returns the plan."""
    from torch.sparse import to_sparse_semi_structured

    device = require_sparse_gpu()
    model.to(device=device, dtype=dtype)
    decisions = plan(model)
    by_name = {d.name: d for d in decisions}
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.layers()):
        for name, linear in adapter.decoder_linears(layer).items():
            if by_name[f"layers.{index}.{name}"].convert:
                linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
    return decisions
