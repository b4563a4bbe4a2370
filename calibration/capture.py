"""Layer-by-layer capture: run calibration data through one decoder layer at a time.

1. Every decoder layer's `forward` is swapped for a recorder that stores what the layer is called
   with (keyword arguments: attention mask, position ids, rotary position embeddings, ...) and
   passes the hidden states straight through. One pass of the base model then yields the inputs
   of layer 0 and the exact call arguments of every layer, whatever the architecture computes
   outside its layers (per-layer-type masks and rotary tables included). No layer does any work.
2. Layers then run one at a time over all calibration batches. The caller attaches statistic
   hooks, prunes the layer, and advances: the (pruned) outputs become the next layer's inputs.

Memory held: the current hidden states of all calibration batches (one layer's inputs) and the
next layer's outputs, never the whole model's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from compress.errors import NumericalError


class _Passthrough(Exception):
    pass


class LayerwiseCapture:
    """Calibration hidden states and per-layer call arguments, advanced one decoder layer at a time."""

    def __init__(self, adapter, windows: torch.Tensor, batch_size: int = 8, progress: Callable | None = None):
        self.adapter = adapter
        self.batch_size = batch_size
        self.progress = progress
        self.hidden: list[torch.Tensor] = []
        self.layer_kwargs: list[list[dict]] = []
        self._record(windows)

    @torch.no_grad()
    def _record(self, windows: torch.Tensor) -> None:
        layers = self.adapter.layers()
        recorded: list[list[dict]] = [[] for _ in layers]
        first_inputs: list[torch.Tensor] = []
        originals = {}

        def recorder(index):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
                kwargs["use_cache"] = False
                recorded[index].append(kwargs)
                if index == 0:
                    first_inputs.append(hidden.detach())
                return hidden
            return forward

        base = self.adapter.base_model()
        device = next(self.adapter.model.parameters()).device
        try:
            for index, layer in enumerate(layers):
                originals[index] = layer.forward
                layer.forward = recorder(index)
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size].to(device)
                base(input_ids=batch, use_cache=False)
        finally:
            for index, layer in enumerate(layers):
                if "forward" in layer.__dict__:
                    del layer.forward
        self.hidden = first_inputs
        self.layer_kwargs = recorded

    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        yield from enumerate(self.adapter.layers())

    @torch.no_grad()
    def forward(self, index: int, layer: nn.Module) -> list[torch.Tensor]:
        """Outputs of decoder layer `index` for every calibration batch (inputs are kept)."""
        outputs = []
        for batch, kwargs in zip(self.hidden, self.layer_kwargs[index]):
            out = layer(batch, **kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(out)
            if self.progress is not None:
                self.progress(batch.shape[0])
        check_finite(outputs, f"layer {index} output")
        return outputs

    def advance(self, outputs: Sequence[torch.Tensor]) -> None:
        """The outputs of the layer just processed become the inputs of the next one."""
        self.hidden = list(outputs)


def check_finite(tensors, what: str) -> None:
    for tensor in tensors if isinstance(tensors, (list, tuple)) else [tensors]:
        if not torch.isfinite(tensor).all():
            raise NumericalError(f"NaN or Inf in {what}; lower the learning rate or use float32 (dtype=float32)")
