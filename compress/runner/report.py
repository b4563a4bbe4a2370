"""Measurements that go into report.json: parameter counts, zero fraction, memory peaks, versions."""

from __future__ import annotations

import importlib.metadata
import platform
import resource

import compress


def layer_params(adapter) -> list[dict]:
    """Per decoder layer: weights of its attention and MLP linears and how many are exactly zero."""
    rows = []
    for index, layer in enumerate(adapter.layers()):
        row = {"attention_params": 0, "mlp_params": 0, "zeros": 0}
        with adapter.onloaded(index, write_back=False):
            for name, linear in adapter.decoder_linears(layer).items():
                kind = "mlp" if name.startswith(f"{adapter.mlp_name}.") else "attention"
                row[f"{kind}_params"] += linear.weight.numel()
                row["zeros"] += int((linear.weight == 0).sum())
        rows.append(row)
    return rows


def layer_shares(before: dict, after: dict) -> dict:
    """A layer's report entry: the share of its attention and MLP weights removed, and of zeros left."""
    removed = {kind: round(1 - after[f"{kind}_params"] / before[f"{kind}_params"], 6) if before[f"{kind}_params"]
               else 0.0 for kind in ("attention", "mlp")}
    kept = after["attention_params"] + after["mlp_params"]
    return {"attention_removed": removed["attention"], "mlp_removed": removed["mlp"],
            "zero_fraction": round(after["zeros"] / kept, 6) if kept else 0.0}


def decoder_zero_fraction(adapter) -> float:
    """Fraction of exact zeros in the decoder linears (what weight-level masks produce)."""
    rows = layer_params(adapter)
    return sum(r["zeros"] for r in rows) / sum(r["attention_params"] + r["mlp_params"] for r in rows)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("compress", "torch", "transformers", "safetensors"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = getattr(compress, "__version__", None) if package == "compress" else None
    return found
