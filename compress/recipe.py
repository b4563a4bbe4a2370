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
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator

from compress.config import DataSource, StageConfig, Strict, source_for_file
from compress.errors import UserError
from compress.methods import METHODS

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


class ModelConfig(Strict):
    name: str | None = Field(None, description="built-in name, Hugging Face id, local folder or .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    device_map: str | dict[str, str | int] | None = Field(
        None, description="accelerate device map: 'auto', or module name -> 'cpu' / 'disk' / GPU index")
    max_memory: dict[str | int, str | int] | None = Field(
        None, description="memory per device for device_map=auto, e.g. {cpu: 2GiB, 0: 70GiB}; the rest goes to disk")
    offload_folder: str | None = Field(
        None, description="folder for disk-offloaded layers (default: beside the output)")

    @property
    def offloading(self) -> bool:
        return self.device_map is not None or self.max_memory is not None


class CalibrationConfig(DataSource):
    source: Literal["builtin", "text", "jsonl", "hf", "self"] = Field(
        "builtin", description="builtin (a named data set) | text | jsonl | hf | self (text the model writes)")
    path: str | None = Field(None, description="text/jsonl file; data_files for source=hf")
    num_samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0
    batch_size: int = Field(4, ge=1)


class ExportConfig(Strict):
    output: str | None = None
    overwrite: bool = False
    max_shard_size: str = "2GB"
    verify: bool = True
    verify_tolerance: float = Field(1e-4, gt=0)


class EvalConfig(DataSource):
    """Perplexity text: the packaged WikiText-2 test split by default; `text: FILE` reads a file instead."""

    ppl: Literal["none", "quick", "full"] | Annotated[int, Field(ge=1)] = "quick"
    text: str | None = Field(None, description="evaluation text file (sets source=text)")
    seq_len: int = Field(512, ge=8)
    dense: bool = True
    speed: bool = False

    @classmethod
    def _file_key(cls) -> str:
        return "text"


def _stage_union():
    configs = tuple(cls.Config for cls in METHODS.values())
    return Annotated[Union[configs], Field(discriminator="method")]  # noqa: UP007


StageUnion = _stage_union()


class Recipe(Strict):
    description: str = ""
    model: ModelConfig = ModelConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    stages: list[StageUnion] = Field(min_length=1)
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    threads: int | None = Field(None, ge=1)
    resume: bool = Field(True, description="keep per-layer progress in .OUTPUT.work/ so a killed run continues")

    @field_validator("stages", mode="before")
    @classmethod
    def _known_methods(cls, stages):
        for index, stage in enumerate(stages or []):
            if isinstance(stage, dict):
                method = stage.get("method")
                if method is None:
                    raise ValueError(f"stage {index} has no 'method'; available: {', '.join(sorted(METHODS))}")
                if method not in METHODS:
                    close = difflib.get_close_matches(str(method), list(METHODS), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise ValueError(f"unknown method '{method}'{hint}; available: {', '.join(sorted(METHODS))}")
        return stages


SECTIONS = {"model": ModelConfig, "calibration": CalibrationConfig, "export": ExportConfig, "eval": EvalConfig}
ALIASES = {
    "model": "model.name",
    "output": "export.output",
    "overwrite": "export.overwrite",
    "ppl": "eval.ppl",
    "seed": "calibration.seed",
    "dtype": "model.dtype",
}
STAGE_ALIASES = ("sparsity", "pattern")  # the one stage's key, when the recipe has a single stage


# ---- loading -----------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML without YAML 1.1's base-60 integers, so `pattern: 2:4` stays the string '2:4' (not 124)."""


_INT = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                                               r"|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: no Python objects


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


def parse_value(text: str) -> Any:
    try:
        return load_yaml(text) if text != "" else None
    except yaml.YAMLError:
        return text


def apply_override(data: dict, key: str, value: Any) -> None:
    """Set `key` (dotted path with list indices) in the raw recipe dict."""
    if key in ALIASES and not isinstance(value, dict):
        key = ALIASES[key]
    elif key in STAGE_ALIASES:
        stages = data.get("stages") or []
        if len(stages) != 1:
            raise UserError(f"{key}= is ambiguous with {len(stages)} stages; use stages.N.{key}=")
        key = f"stages.0.{key}"
    elif key == "calibration" and not isinstance(value, dict):
        if value == "self":
            _data_free(data)
        if value in ("builtin", "text", "jsonl", "hf", "self"):
            key = "calibration.source"
        else:
            data.setdefault("calibration", {})["source"] = source_for_file(value)
            key = "calibration.path"
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise UserError(f"override {key}: '{where}' needs a list index")
            index = int(part)
            if index >= len(node):
                raise UserError(f"override {key}: index {index} out of range ({len(node)} entries)")
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                _follow_file_choice(node, part, key, value)
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise UserError(f"override {key}: '{'.'.join(parts[:depth])}' is a value, not a section")


def _follow_file_choice(block: dict, part: str, key: str, value: Any) -> None:
    """A data block follows what the user just named: a file (`...path=`, `eval.text=`) or a named set (`...name=`)."""
    data_block = key.startswith(("calibration.", "eval.")) or ".data." in key
    file_key = "text" if key.startswith("eval.") else "path"
    if not data_block or value is None:
        return
    if part == file_key and block.get("source", "builtin") in ("builtin", "self", "calibration"):
        block["source"] = source_for_file(value)
    elif part == "name" and block.get("source") != "builtin":
        block["source"] = "builtin"
        block.pop(file_key, None)


def _data_free(data: dict) -> None:
    """`calibration=self`: no data set is read for pruning or training. LoRA stages that would read the
    default named set train on the self-generated calibration windows instead (eval still measures
    on its text, the packaged WikiText-2 test split by default; `ppl=none` skips it)."""
    for stage in data.get("stages") or []:
        if isinstance(stage, dict) and stage.get("method") == "lora":
            block = stage.setdefault("data", {}) or {}
            if block.get("source", "builtin") == "builtin" and not block.get("path"):
                stage["data"] = {k: v for k, v in block.items() if k != "name"} | {"source": "calibration"}


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


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"argument '{text}' is not key=value; write e.g. model=smollm2-135m")
    key, _, value = text.partition("=")
    if not key:
        raise UserError(f"argument '{text}' has no key before '='")
    return key.strip(), parse_value(value)


def validate_recipe(data: dict) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(_describe(err.errors()[0], data)) from None


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


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
