"""The method registry: name -> method class. Imports nothing from the method modules, so any module
can register or look up a method without an import cycle; `compress.methods` imports the built-in
methods, which register themselves with `@register`."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a `Method` subclass available to recipes under `cls.name`."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is registered twice ({METHODS[cls.name].__module__}, "
                         f"{cls.__module__})")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type:
    return METHODS[name]
