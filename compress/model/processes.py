"""Several processes (`accelerate launch`): every process prunes (deterministically, to the same
model), the recovery stage trains data-parallel, and only the main process writes files."""

from __future__ import annotations

import os


def launched() -> bool:
    """True inside `accelerate launch` / torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    if not launched():
        return True
    return state().is_main_process


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def state():
    """accelerate's process state (gloo on CPU-only machines, so CPU processes form a group too)."""
    from accelerate import PartialState

    return PartialState(cpu=on_cpu())
