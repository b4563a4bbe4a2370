"""Layer-by-layer capture: run calibration data through one decoder layer at a time.

1. Every decoder layer's `forward` is swapped for a recorder that stores what the layer is called
   with (keyword arguments: attention mask, position ids, rotary position embeddings, ...) and
   passes the hidden states straight through. One pass of the base model then yields the inputs
   of layer 0 and the exact call arguments of every layer, whatever the architecture computes
   outside its layers (per-layer-type masks and rotary tables included). No layer does any work.
2. Layers then run one at a time over all calibration batches. The caller attaches statistic
   hooks, prunes the layer, and advances: the (pruned) outputs replace the inputs batch by batch.

Memory held: the hidden states of all calibration batches at one depth of the model (128 x 512 x
576 floats = 151 MB for SmolLM2), never the whole model's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from compress.arch.moe import routed_experts
from compress.errors import NonFiniteInput, NumericalError
from compress.model.offload import model_device

# the key/value cache of a decoder call (the names transformers has used); calibration runs without one
CACHE_KEYWORDS = ("past_key_values", "past_key_value", "cache")


class LayerwiseCapture:
    """Calibration hidden states and per-layer call arguments, advanced one decoder layer at a time."""

    def __init__(self, adapter, windows: torch.Tensor, batch_size: int = 4, progress: Callable | None = None):
        self.adapter = adapter
        self.batch_size = batch_size
        self.progress = progress
        self.hidden: list[torch.Tensor] = []
        self.layer_kwargs: list[list[dict]] = []
        self.recorded: dict[nn.Module, list[torch.Tensor]] = {}  # inputs `record` passes kept, per batch
        self.settled: set[nn.Module] = set()  # recorded modules whose list now holds their outputs (`forward`)
        self.start = 0
        self._record(windows)

    def resume(self, depth: int, hidden: list[torch.Tensor]) -> None:
        """Continue from saved hidden states: `hidden` are the inputs of layer `depth`."""
        if [h.shape for h in hidden] != [h.shape for h in self.hidden]:
            raise ValueError("saved hidden states do not match the calibration batches")
        self.hidden = hidden
        self.start = depth
        if self.progress is not None:
            self.progress(depth * sum(h.shape[0] for h in hidden))

    @torch.no_grad()
    def _record(self, windows: torch.Tensor) -> None:
        layers = self.adapter.layers()
        recorded: list[list[dict]] = [[] for _ in layers]
        first_inputs: list[torch.Tensor] = []
        originals = {}

        def recorder(index):
            def forward(*args, **kwargs):
                if len(args) > 1:  # a layout this capture does not know: never replay a layer without them
                    raise RuntimeError(f"decoder layer {index} was called with {len(args)} positional arguments; "
                                       f"the capture records hidden states plus keyword arguments only")
                hidden = args[0] if args else kwargs.pop("hidden_states")
                kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_KEYWORDS}
                kwargs["use_cache"] = False
                recorded[index].append(kwargs)
                if index == 0:
                    first_inputs.append(hidden.detach())
                return hidden
            return forward

        base = self.adapter.base_model()
        device = model_device(self.adapter.model)
        try:
            for index, layer in enumerate(layers):
                originals[index] = layer.__dict__.get("forward")  # accelerate's hook wrapper, if any
                layer.forward = recorder(index)
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start:start + self.batch_size].to(device)
                base(input_ids=batch, use_cache=False)
        finally:
            for index, layer in enumerate(layers):
                if originals.get(index) is not None:
                    layer.forward = originals[index]
                elif "forward" in layer.__dict__:
                    del layer.forward
        self.hidden = first_inputs
        self.layer_kwargs = recorded

    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        """(index, layer) from the current depth on; a disk-offloaded layer is in memory while it is handled."""
        for index, layer in enumerate(self.adapter.layers()):
            if index >= self.start:
                with self.adapter.onloaded(index):
                    yield index, layer

    @torch.no_grad()
    def forward(self, index: int, layer: nn.Module, advance: bool = True, stop_at: nn.Module | None = None,
                record: nn.Module | None = None, replay: list[tuple[nn.Module, nn.Module]] = ()) -> None:
        """Run decoder layer `index` over every calibration batch (hooks see its inputs).

        `advance=True`: each batch's output replaces its input as soon as it is computed, so the
        next layer's inputs take no extra memory. `advance=False`: outputs are discarded (a
        statistics pass before the layer is pruned and run again); `stop_at` then ends each batch
        when that submodule is about to run (after its own input hooks), skipping the rest.

        `record` (a submodule): keep the input it receives in every batch (`self.recorded[record]`,
        until the next advancing pass). `replay`: (block, last) pairs whose block's output is `last`
        applied to its recorded inputs, e.g. an attention block whose last step is o_proj once q/k/v
        are final, so this pass skips the block's work (`replay_output`). The first pass that replays
        `last` replaces its recorded inputs by its outputs, so `last` must be final by then (o_proj
        pruned) and later passes cost nothing for the block.
        """
        if advance and stop_at is not None:
            raise ValueError("stop_at is for statistics passes (advance=False)")
        kept: list[torch.Tensor] = []
        handles = []
        if record is not None:
            handles.append(record.register_forward_pre_hook(lambda _m, args: kept.append(args[0])))
        if stop_at is not None:  # after the statistics and record hooks, which must see the input first
            handles.append(stop_at.register_forward_pre_hook(_stop))
        position = [0]
        experts = self.adapter.experts(layer) if getattr(self.adapter, "is_moe", False) else None
        for _block, last in replay:
            if last not in self.settled:  # inputs -> outputs, one batch at a time (no second copy)
                kept_inputs = self.recorded[last]
                for batch_index, inputs in enumerate(kept_inputs):
                    kept_inputs[batch_index] = last(inputs)
                self.settled.add(last)
        try:
            # MoE: hooks on the expert views see the routed tokens
            with routed_experts([experts]), ExitStack() as replayed:
                for block, last in replay:
                    replayed.enter_context(replay_output(block, self.recorded[last], position))
                for batch_index, (batch, kwargs) in enumerate(zip(self.hidden, self.layer_kwargs[index])):
                    position[0] = batch_index
                    try:
                        out = layer(batch, **kwargs)
                        if isinstance(out, (tuple, list)):
                            out = out[0]
                        if not torch.isfinite(out).all():
                            raise NonFiniteInput(f"the output of decoder layer {index}")
                    except _Stop:
                        out = None
                    except NonFiniteInput as err:
                        culprit = locate_nonfinite(layer, batch, kwargs)
                        raise NumericalError(f"NaN or Inf in the output of {culprit or 'an unknown module'} of decoder "
                                             f"layer {index} (seen in {str(err).removeprefix('NaN or Inf in ')}); "
                                             f"run in float32 (dtype=float32) or check the model weights") from None
                    if advance:
                        self.hidden[batch_index] = out
                        for _block, last in replay:  # its last use: the memory goes as the pass proceeds
                            self.recorded[last][batch_index] = None
                    if self.progress is not None:
                        self.progress(batch.shape[0])
        finally:
            for handle in handles:
                handle.remove()
        if record is not None:
            self.recorded[record] = kept
        if advance:
            self.recorded, self.settled = {}, set()  # the next layer records its own


@contextmanager
def replay_output(block: nn.Module, outputs: list[torch.Tensor], position: list[int]):
    """While active, `block(...)` returns `outputs[position[0]]` in place of its own output (the first
    element of a tuple output) instead of running: valid when the block's output is its last
    submodule's output and those are that submodule's outputs on the same batches.

    The first call runs the block as usual and compares: if its output is not the kept one (a block
    that adds, scales or normalises after its last submodule), the block simply runs for the rest
    of the pass.
    """
    original = block.forward
    own = block.__dict__.get("forward")  # a wrapper accelerate installed, if any
    state = {"template": None, "valid": None}

    def forward(*args, **kwargs):
        if state["valid"] is False or position[0] >= len(outputs):
            return original(*args, **kwargs)
        result = outputs[position[0]]
        if state["valid"] is None:  # first call: run the block for real and check the shortcut
            real = original(*args, **kwargs)
            first = real[0] if isinstance(real, (tuple, list)) else real
            state["valid"] = (isinstance(first, torch.Tensor) and first.shape == result.shape
                              and torch.allclose(first, result, rtol=1e-5, atol=1e-6))
            state["template"] = real
            return real
        template = state["template"]
        return type(template)((result, *template[1:])) if isinstance(template, (tuple, list)) else result

    block.forward = forward
    try:
        yield
    finally:
        if own is not None:
            block.forward = own
        else:
            del block.forward


@torch.no_grad()
def locate_nonfinite(layer: nn.Module, batch: torch.Tensor, kwargs: dict) -> str | None:
    """Name of the first submodule of `layer` whose output has NaN/Inf on this batch (re-run with hooks)."""
    found: list[str] = []

    def hook(name):
        def check(_module, _args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if not found and isinstance(tensor, torch.Tensor) and tensor.is_floating_point() \
                    and not torch.isfinite(tensor).all():
                found.append(name)
        return check

    handles = [module.register_forward_hook(hook(name)) for name, module in layer.named_modules() if name]
    try:
        layer(batch, **kwargs)
    except (_Stop, NonFiniteInput):  # statistics hooks may still be attached
        pass
    finally:
        for handle in handles:
            handle.remove()
    if found:
        return found[0]
    return "the layer's input" if not torch.isfinite(batch).all() else None


class _Stop(Exception):
    """Raised by a pre-hook to end a statistics pass early."""


def _stop(_module, _args):
    raise _Stop

