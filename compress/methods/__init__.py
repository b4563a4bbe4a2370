"""Pruning methods. One file per method; each registers its name, config class and implementation
with `@register` (compress.methods.registry). Importing this package imports every method module in
it, so a new method is one new file here (plus, if you like, a recipe in recipes/)."""

from __future__ import annotations

import importlib
import pkgutil

from compress.methods.registry import METHODS, get_method, register

# the shared parts, not methods
_NOT_METHODS = {"base", "registry", "structured", "weight", "weight_config"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_METHODS:
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "get_method", "register"]
