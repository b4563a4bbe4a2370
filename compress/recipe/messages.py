"""A pydantic validation error as one line naming the recipe key and the closest valid key."""

from __future__ import annotations

import difflib

from compress.config import StageConfig
from compress.methods import METHODS
from compress.recipe.schema import SECTIONS, Recipe


def _describe(error: dict, data: dict) -> str:
    loc = list(error["loc"])
    # Discriminated unions insert the tag ('flap') after the list index; drop it from the path.
    if len(loc) >= 3 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in METHODS:
        loc.pop(2)
    path = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(loc[:-1], data)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        if close:
            suggestion = ".".join(str(p) for p in loc[:-1] + [close[0]])
        else:  # maybe the key exists one level down (e.g. 'uniform' -> 'stages.0.uniform')
            nested = _all_paths(data)
            leaf = difflib.get_close_matches(str(loc[-1]), [p.rsplit(".", 1)[-1] for p in nested], n=1, cutoff=0.8)
            suggestion = next((p for p in nested if leaf and p.rsplit(".", 1)[-1] == leaf[0]), None)
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return f"unknown recipe key '{path}'{hint} (valid here: {', '.join(valid)})"
    if kind == "missing":
        return f"recipe key '{path}' is required"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) else f" (got {value!r})"
    return f"recipe key '{path}': {message}{shown}" if path else f"recipe: {message}"


def _valid_keys(parent: list, data: dict) -> list[str]:
    if not parent:
        return list(Recipe.model_fields)
    if parent[0] in SECTIONS and len(parent) == 1:
        return list(SECTIONS[parent[0]].model_fields)
    if parent[0] == "stages" and len(parent) == 2:
        try:
            method = data["stages"][parent[1]]["method"]
            return list(METHODS[method].Config.model_fields)
        except (KeyError, IndexError, TypeError):
            return list(StageConfig.model_fields)
    return []


def _all_paths(data: dict) -> list[str]:
    paths = [f"{section}.{key}" for section, cls in SECTIONS.items() for key in cls.model_fields]
    for index, stage in enumerate(data.get("stages") or []):
        method = stage.get("method") if isinstance(stage, dict) else None
        fields = METHODS[method].Config.model_fields if method in METHODS else StageConfig.model_fields
        paths += [f"stages.{index}.{key}" for key in fields]
    return paths
