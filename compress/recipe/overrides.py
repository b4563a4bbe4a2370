"""The command-line grammar of recipes: safe YAML values and `dotted.path=value` overrides with aliases."""

from __future__ import annotations

import re
from typing import Any

import yaml

from compress.config import source_for_file
from compress.errors import UserError

ALIASES = {
    "model": "model.name",
    "output": "export.output",
    "overwrite": "export.overwrite",
    "ppl": "eval.ppl",
    "seed": "calibration.seed",
    "dtype": "model.dtype",
}
STAGE_ALIASES = ("sparsity", "pattern")  # the one stage's key, when the recipe has a single stage


class _Loader(yaml.SafeLoader):
    """Safe YAML without YAML 1.1's base-60 integers, so `pattern: 2:4` stays the string '2:4' (not 124)."""


_INT = "tag:yaml.org,2002:int"
_Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != _INT]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)"
                                               r"|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass: no Python objects


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
        if isinstance(stage, dict) and stage.get("method") in ("lora", "loraprune"):
            block = stage.setdefault("data", {}) or {}
            if block.get("source", "builtin") == "builtin" and not block.get("path"):
                stage["data"] = {k: v for k, v in block.items() if k != "name"} | {"source": "calibration"}


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"argument '{text}' is not key=value; write e.g. model=smollm2-135m")
    key, _, value = text.partition("=")
    if not key:
        raise UserError(f"argument '{text}' has no key before '='")
    return key.strip(), parse_value(value)
