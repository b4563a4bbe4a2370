"""Measurements that go into report.json: parameter counts, zero fraction, memory peaks, versions."""

from __future__ import annotations

import importlib.metadata
import platform
import resource

import compress


def decoder_zero_fraction(adapter) -> float:
    """Fraction of exact zeros in the decoder linears (what weight-level masks produce)."""
    zeros = total = 0
    for index, layer in enumerate(adapter.layers()):
        with adapter.onloaded(index, write_back=False):
            for linear in adapter.decoder_linears(layer).values():
                zeros += int((linear.weight == 0).sum())
                total += linear.weight.numel()
    return zeros / total


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
