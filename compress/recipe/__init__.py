"""Recipes: one YAML file = model + calibration + ordered stages + export + eval.

    compress run recipe=flap_20 model=smollm2-135m output=out/flap20 stages.0.sparsity=0.3

`recipe=` is a YAML path or the name of a packaged recipe (`recipes/NAME.yaml`). Every other
argument is `dotted.path=value` (list indices allowed, values typed by YAML: `0.3`, `true`,
`[1, 2]`), with short aliases for everyday keys (`model`, `output`, `calibration`, `sparsity`,
`ppl`, `overwrite`, `seed`, and `sparsity`/`pattern` for one-stage recipes). Unknown keys are
errors that name the full path and the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import ValidationError

import recipes as _packaged
from compress.errors import UserError
from compress.recipe.messages import _describe
from compress.recipe.overrides import _split_override, apply_override, load_yaml, parse_value
from compress.recipe.schema import (
    SECTIONS,
    CalibrationConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    Recipe,
    StageUnion,
)

RECIPES_DIR = Path(_packaged.__file__).resolve().parent

__all__ = ["SECTIONS", "CalibrationConfig", "EvalConfig", "ExportConfig", "ModelConfig", "Recipe", "StageUnion",
           "RECIPES_DIR", "apply_override", "dump_recipe", "find_recipe", "load_recipe", "load_yaml",
           "packaged_recipes", "parse_value", "read_recipe_file", "validate_recipe"]


def packaged_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    close = difflib.get_close_matches(name_or_path, packaged_recipes(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"recipe not found: '{name_or_path}'{hint}; give a YAML path or one of: "
                    f"{', '.join(packaged_recipes())}")


def read_recipe_file(path: Path) -> dict:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"recipe {path}{where} is not valid YAML: {getattr(err, 'problem', err)}") from err
    except OSError as err:
        raise UserError(f"cannot read recipe {path}: {err.strerror}") from err
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a YAML mapping (model:, calibration:, stages:, ...)")
    return data


def load_recipe(recipe: str | Path | dict, overrides: list[str] | dict | None = None) -> Recipe:
    """Read (file, packaged name or dict), apply overrides, validate."""
    if isinstance(recipe, dict):
        data = load_yaml(yaml.safe_dump(recipe))
    else:
        data = read_recipe_file(find_recipe(str(recipe)))
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides or []]
    for key, value in items:
        apply_override(data, key, value)
    return validate_recipe(data)


def validate_recipe(data: dict) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe(err.errors()[0], data)) from None


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
