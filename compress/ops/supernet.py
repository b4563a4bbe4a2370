"""Týr's supernet (every layer's candidate prunings, stored compactly) and the search's fitness.

A candidate of (layer, kind, count) removes `count` KV groups or MLP channels. It is stored as the
kept unit indices and the compensation delta of the output projection's kept columns (plus its
bias shift), float16 by default: q/k/v and gate/up rows are only indexed, so a candidate costs a
third of the MLP's weights or less. One file per layer and round in the work folder.

`KlFitness` scores a configuration (removal count per layer and kind) by KL(dense || pruned) over
held calibration windows: the dense model's top-k next-token distribution per position (both
renormalised over the dense top-k, as the released code does). The inputs of every layer under the
current parent are cached, so a child is run only from the first layer it changes.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from calibration.capture import LayerwiseCapture
from compress.model.evaluate import head_logits
from compress.ops.slicing import _new_linear, attention_unit_params, group_channels, keep_rows, mlp_unit_params
from compress.workdir import load, save_atomic


def variant_modules(adapter, layer: nn.Module, kind: str, kept: torch.Tensor, delta: torch.Tensor,
                    bias: torch.Tensor) -> dict[str, nn.Linear]:
    """The linears of `kind` ("attention" | "mlp") with only `kept` units, the output projection's kept
    columns shifted by `delta` and its bias by `bias`."""
    if kind == "attention":
        q_index, kv_index = group_channels(adapter.attention_shape(layer), kept)
        q, k, v = adapter.qkv(layer)
        out, columns = adapter.o_proj(layer), q_index
        modules = {adapter.q_name: keep_rows(q, q_index), adapter.k_name: keep_rows(k, kv_index),
                   adapter.v_name: keep_rows(v, kv_index)}
        name = adapter.o_name
    else:
        gate, up = adapter.gate_up(layer)
        out, columns = adapter.down_proj(layer), kept
        modules = {adapter.gate_name: keep_rows(gate, kept), adapter.up_name: keep_rows(up, kept)}
        name = adapter.down_name
    weight = out.weight.detach()
    base = out.bias.detach().float() if out.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    modules[name] = _new_linear(weight[:, columns] + delta.to(weight.device, weight.dtype),
                                (base + bias.to(base.device)).to(weight.dtype))
    return modules


@contextmanager
def installed(adapter, layer: nn.Module, variants: dict[str, dict[str, nn.Linear] | None]):
    """While inside, `layer` runs with the given linears per kind (None: as it is)."""
    attention, mlp = adapter.attention(layer), adapter.mlp(layer)
    saved = []
    for kind, modules in variants.items():
        parent = attention if kind == "attention" else mlp
        for name, module in (modules or {}).items():
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, module)
    heads = adapter.attention_shape(layer)
    counts = {name: getattr(attention, name) for name in ("num_heads", "num_key_value_heads")
              if hasattr(attention, name)}
    for name, value in (("num_heads", heads.num_heads), ("num_key_value_heads", heads.num_kv_heads)):
        if name in counts:
            setattr(attention, name, value)
    try:
        yield
    finally:
        for parent, name, module in reversed(saved):
            setattr(parent, name, module)
        for name, value in counts.items():
            setattr(attention, name, value)


@torch.no_grad()
def expected_outputs(adapter, supernet: "Supernet", capture, index: int, layer: nn.Module,
                     levels: dict[str, list[int]], variants: int) -> list[torch.Tensor]:
    """Týr's expectation error accumulation: the mean output of `variants` candidates of the layer
    (evenly spread over each kind's `levels`, paired lightest to heaviest), each weighted by 1 - its
    share of the layer's parameters removed; one entry per calibration batch of `capture`."""
    n = min(variants, max(len(v) for v in levels.values()))
    unit = {"attention": attention_unit_params(adapter, layer), "mlp": mlp_unit_params(adapter, layer)}
    size = {"attention": adapter.attention_shape(layer).num_kv_heads, "mlp": adapter.intermediate_size(layer)}
    total = sum(size[kind] * unit[kind] for kind in levels)
    sums, weights = [torch.zeros_like(h) for h in capture.hidden], 0.0
    for j in range(n):
        chosen = {kind: grid[round(j * (len(grid) - 1) / (n - 1))] if n > 1 else grid[len(grid) // 2]
                  for kind, grid in levels.items()}
        weight = 1.0 - sum(chosen[kind] * unit[kind] for kind in chosen) / total
        modules = {kind: supernet.modules(adapter, index, kind, count) for kind, count in chosen.items()}
        with installed(adapter, layer, modules):
            for b, (h, kwargs) in enumerate(zip(capture.hidden, capture.layer_kwargs[index])):
                out = layer(h, **kwargs)
                sums[b] += weight * (out[0] if isinstance(out, (tuple, list)) else out)
        weights += weight
    return [s / weights for s in sums]


class Supernet:
    """One round's candidates on disk, read back per layer (a small cache of built linears)."""

    def __init__(self, directory: Path, round_: int, dtype: torch.dtype = torch.float16, cache_layers: int = 64):
        self.directory, self.round, self.dtype = Path(directory), round_, dtype
        self._cache: OrderedDict = OrderedDict()
        self.cache_layers = cache_layers

    def path(self, index: int) -> Path:
        return self.directory / f"supernet-{self.round}-{index:04d}.safetensors"

    def save_layer(self, index: int, candidates: dict[tuple[str, int], tuple]) -> None:
        tensors = {}
        for (kind, count), (kept, delta, bias) in candidates.items():
            tensors[f"{kind}.{count}.kept"] = kept.to(torch.int32)
            tensors[f"{kind}.{count}.delta"] = delta.to(self.dtype)
            tensors[f"{kind}.{count}.bias"] = bias.float()
        save_atomic(self.path(index), tensors)

    def has_layer(self, index: int) -> bool:
        return self.path(index).is_file()

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob(f"supernet-{self.round}-*.safetensors"))

    def modules(self, adapter, index: int, kind: str, count: int) -> dict[str, nn.Linear] | None:
        """The candidate's linears (None for count 0: the layer as it is)."""
        if count == 0:
            return None
        key = (index, kind, count)
        if key not in self._cache:
            tensors, _ = load(self.path(index))
            layer = adapter.layers()[index]
            self._cache[key] = variant_modules(adapter, layer, kind, tensors[f"{kind}.{count}.kept"].long(),
                                               tensors[f"{kind}.{count}.delta"], tensors[f"{kind}.{count}.bias"])
            while len(self._cache) > self.cache_layers:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def remove(self) -> None:
        for path in self.directory.glob(f"supernet-{self.round}-*.safetensors"):
            path.unlink()


class KlFitness:
    """KL(dense || configuration) per token over the dense top-k, on held calibration windows.

    `stages[s]` = windows used by selection stage s (the first ones of `windows`)."""

    def __init__(self, adapter, windows: torch.Tensor, stages: list[int], top_k: int, chunk: int = 128):
        self.adapter, self.stages, self.chunk = adapter, stages, chunk
        self.capture = LayerwiseCapture(adapter, windows, batch_size=1)
        self.supernet: Supernet | None = None
        self.teacher = [self._top(self._logits(h), top_k) for h in self._run({}, self.capture.hidden, 0)]
        self.parent: dict | None = None
        self.cache: list[list[torch.Tensor]] = []  # inputs of every layer under the parent, per window

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.adapter.model, self.adapter.base_model().norm(hidden)[0])

    @staticmethod
    def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        values, index = torch.topk(logits, min(k, logits.shape[-1]), dim=-1)
        return torch.log_softmax(values, dim=-1), index

    def _variants(self, config: dict, index: int) -> dict:
        if self.supernet is None:
            return {}
        return {kind: self.supernet.modules(self.adapter, index, kind, count)
                for (layer, kind), count in config.items() if layer == index}

    @torch.no_grad()
    def _run(self, config: dict, hidden: list[torch.Tensor], start: int, record: list | None = None):
        """Outputs of the last layer for windows whose inputs to layer `start` are `hidden`."""
        hidden = list(hidden)
        adapter = self.adapter
        for index in range(start, adapter.num_layers()):
            if record is not None:
                record.append(list(hidden))
            layer = adapter.layers()[index]
            with adapter.onloaded(index, write_back=False), installed(adapter, layer, self._variants(config, index)):
                for w, h in enumerate(hidden):
                    out = layer(h, **self.capture.layer_kwargs[index][w])
                    hidden[w] = out[0] if isinstance(out, (tuple, list)) else out
        return hidden

    def use(self, supernet: Supernet, parent: dict) -> None:
        """Score candidates of `supernet`; cache the layer inputs of `parent`."""
        self.supernet, self.parent, self.cache = supernet, dict(parent), []
        self._run(parent, self.capture.hidden, 0, record=self.cache)

    def set_parent(self, parent: dict) -> None:
        start = self._first_change(parent)
        if start is None:
            return
        record = self.cache[:start]
        self._run(parent, self.cache[start], start, record=record)
        self.parent, self.cache = dict(parent), record

    def _first_change(self, config: dict) -> int | None:
        changed = [layer for (layer, kind), count in config.items() if self.parent.get((layer, kind)) != count]
        return min(changed) if changed else None

    def __call__(self, config: dict, stage: int = -1) -> float:
        windows = self.stages[stage]
        if not self.cache:
            return self.kl(self._run(config, self.capture.hidden[:windows], 0))
        start = self._first_change(config)
        start = self.adapter.num_layers() - 1 if start is None else start
        return self.kl(self._run(config, self.cache[start][:windows], start))

    @torch.no_grad()
    def kl(self, outputs: list[torch.Tensor]) -> float:
        total, tokens = 0.0, 0
        for w, hidden in enumerate(outputs):
            teacher, index = self.teacher[w]
            logits = self._logits(hidden)
            for start in range(0, logits.shape[0], self.chunk):
                part = slice(start, start + self.chunk)
                student = torch.log_softmax(logits[part].gather(-1, index[part]), dim=-1)
                total += float((teacher[part].exp() * (teacher[part] - student)).sum())
                tokens += logits[part].shape[0]
        return total / max(tokens, 1)
