"""Pruning methods. One file per method; each registers its name, config class and implementation."""

from __future__ import annotations

from compress.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    return METHODS[name]


from compress import recovery as _recovery  # noqa: E402,F401
from compress.methods import cfsp as _cfsp  # noqa: E402,F401
from compress.methods import flap as _flap  # noqa: E402,F401
from compress.methods import gblm as _gblm  # noqa: E402,F401
from compress.methods import magnitude as _magnitude  # noqa: E402,F401
from compress.methods import wanda as _wanda  # noqa: E402,F401
from compress.methods import wanda_sp as _wanda_sp  # noqa: E402,F401
