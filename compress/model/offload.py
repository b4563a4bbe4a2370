"""Models bigger than memory: accelerate's big-model loading, and one decoder layer in memory at a time.

The model is loaded with `device_map` / `max_memory` / `offload_folder` (accelerate's big-model
support, through `from_pretrained`): layers that do not fit stay on disk and accelerate's hooks
stream their weights in for every forward. That is enough for evaluation, but calibration works
on a layer for minutes and slicing rewrites its weights, so the toolkit goes one step further:

    with onloaded(layer, store):   # weights read once into memory, hooks removed
        statistics, scoring, masking or slicing of this layer
    # on exit: the (pruned) layer is written to `store` and handed back to accelerate's hooks

so at most one offloaded layer is resident at a time, whatever the model's size. Layers placed in
memory (or on a GPU) by the device map are left alone. Streamed weights are served from their own
memory mappings (`OFFLOAD_MMAP_THRESHOLD`), so each is returned to the system when it is released
instead of fragmenting the heap (measured on SmolLM2: forward peak 915 -> 726 MB).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compress.model.memory import trim_heap

OFFLOAD_MMAP_THRESHOLD = 1 << 20  # bytes; allocations above it get their own mapping in offloaded runs


class SafetensorsWeights(Mapping):
    """Read-only mapping name -> tensor over one safetensors file, read lazily (accelerate weights_map)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with safe_open(self.path, framework="pt") as handle:
            self._keys = list(handle.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def is_offloaded(module: nn.Module) -> bool:
    """True if some parameter of `module` lives on disk behind an accelerate hook."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in module.modules())


def _hooks(module: nn.Module):
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        if hook is not None:
            yield sub, hook


def onload(layer: nn.Module) -> torch.device:
    """Read every offloaded weight of `layer` into memory and remove its hooks; returns the execution device."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device("cpu")
    for module, hook in list(_hooks(layer)):
        hooks = getattr(hook, "hooks", [hook])  # SequentialHook or a single hook
        for single in hooks:
            if getattr(single, "execution_device", None) is not None:
                device = torch.device(single.execution_device)
            if getattr(single, "offload", False):
                names = [name for name, _ in module.named_parameters(recurse=False)]
                if single.offload_buffers:
                    names += [name for name, _ in module.named_buffers(recurse=False)]
                for name in names:
                    set_module_tensor_to_device(module, name, device, value=single.weights_map[name])
        remove_hook_from_module(module)
    return device


def offload(layer: nn.Module, path: Path, device: torch.device) -> None:
    """Write `layer`'s weights to `path` and hand them to accelerate's hooks (the layer holds no memory)."""
    from accelerate.hooks import attach_align_device_hook

    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in layer.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_file(state, partial)
    partial.replace(path)
    del state
    attach_align_device_hook(layer, execution_device=device, offload=True, weights_map=SafetensorsWeights(path))
    trim_heap()  # the layer's memory goes back to the system, not to a growing heap


@contextmanager
def onloaded(layer: nn.Module, store: Path | None, name: str = "layer", write_back: bool = True):
    """The layer's weights in memory inside the block; offloaded again (to `store/NAME.safetensors`) after.

    `write_back=False` (read-only use) gives the layer its previous hooks back instead of writing it.
    A no-op for layers that are not offloaded (or when `store` is None).
    """
    if not is_offloaded(layer):
        yield layer
        return
    if write_back and store is None:
        raise RuntimeError("a disk-offloaded layer is being changed but the model has no offload store "
                           "(give get_adapter(model, offload_store=FOLDER))")
    from accelerate.hooks import add_hook_to_module

    previous = list(_hooks(layer))
    device = onload(layer)
    try:
        yield layer
    finally:
        if write_back:
            offload(layer, Path(store) / f"{name}.safetensors", device)
        else:
            for module, hook in previous:
                add_hook_to_module(module, hook)  # its init_hook sends the weights back to meta


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the first parameter in memory, else the hooks' execution device."""
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    for _module, hook in _hooks(model):
        for single in getattr(hook, "hooks", [hook]):
            if getattr(single, "execution_device", None) is not None:
                return torch.device(single.execution_device)
    return torch.device("cpu")
