"""Preflight: every check that needs no weights, so a mistake fails in the first second and writes nothing.

The recipe-wide checks live here (model source and architecture, calibration and evaluation data,
output folder, disk space); each stage checks its own fields through its config's `check_model` hook
(N:M widths and stage order, MLP-only budgets, recovery data).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from calibration.data import check_not_eval_text, read_source_text
from calibration.datasets import is_packaged
from compress.arch import base_model_type, supported_model_types
from compress.arch.config_view import ConfigView
from compress.errors import UserError
from compress.export.checkpoint import check_output_dir
from compress.model.loading import cache_root, describe_source, read_config
from compress.recipe.schema import EvalConfig, ModelConfig, Recipe


def preflight(recipe: Recipe, export: bool = True) -> Path | None:
    """Every check that needs no weights. Returns the output folder (or None when not exporting)."""
    kind, config = check_model(recipe.model)
    view = ConfigView(config)
    for number, stage in enumerate(recipe.stages):
        stage.check_model(view, number, recipe)  # each method checks its own fields (N:M widths, data, ...)
    cal = recipe.calibration
    if cal.source == "hf" and not cal.dataset:
        raise UserError("calibration.source=hf needs calibration.dataset=NAME")
    if cal.source == "hf" and cal.dataset in ("json", "text", "csv", "parquet") and cal.path \
            and not Path(cal.path).expanduser().is_file():
        raise UserError(f"calibration file not found: {cal.path} (data_files of the '{cal.dataset}' dataset builder)")
    if cal.source in ("text", "jsonl"):
        if not cal.path or not Path(cal.path).expanduser().is_file():
            raise UserError(f"calibration file not found: {cal.path}; set calibration.path=FILE, "
                            f"calibration.name=wikitext2 (shipped) or calibration=self (no data)")
    if cal.source in ("text", "jsonl") or (cal.source == "builtin" and is_packaged(cal.name)):
        text = read_source_text(cal)  # unreadable / invalid lines fail here
        if not text.strip():
            raise UserError(f"calibration file {cal.path} is empty: pruning needs calibration text; give a file with "
                            f"text in it or use calibration=self")
    check_eval(recipe.eval, view)
    check_not_eval_text(cal, "calibration", "calibration", recipe.eval)
    view.check_context_length("calibration.seq_len", cal.seq_len)
    if not export:
        return None
    output = check_output_dir(recipe.export.output, recipe.export.overwrite, recipe.model.name)
    check_disk_space(recipe, kind, config, output)
    return output


def check_model(model: ModelConfig) -> tuple[str, dict | None]:
    """The model source exists and its architecture is supported: (source kind, config or None)."""
    kind = describe_source(model.name)
    config = read_config(model.name, kind, model.trust_remote_code, model.revision)
    if config is not None and base_model_type(config) not in supported_model_types():
        raise UserError(f"unsupported architecture '{base_model_type(config)}' for {model.name}: "
                        f"supported model types are {', '.join(supported_model_types())}")
    return kind, config


def check_eval(evaluation: EvalConfig, view: ConfigView, file_key: str = "eval.text") -> None:
    if evaluation.tasks:
        from compress.model.evaluate import task_manager

        task_manager(evaluation)  # lm-eval installed, every task known
    if evaluation.ppl == "none":
        return
    if evaluation.source in ("text", "jsonl") and not Path(evaluation.text or "").expanduser().is_file():
        skip = " or ppl=none" if file_key == "eval.text" else ""
        raise UserError(f"evaluation text not found: {evaluation.text}; set {file_key}=FILE{skip}")
    if evaluation.source == "hf" and not evaluation.dataset:
        raise UserError("eval.source=hf needs eval.dataset=NAME")
    view.check_context_length("eval.seq_len", evaluation.seq_len)


def source_weight_bytes(name: str, kind: str) -> int | None:
    folder = Path(name).expanduser() if kind == "folder" else None
    if kind == "builtin":
        folder = cache_root() / "models" / name
    if folder is None or not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None


def check_disk_space(recipe: Recipe, kind: str, config: dict | None, output: Path) -> None:
    """The export needs about the source's weight size (scaled to the recipe's dtype) free next to `output`."""
    size = source_weight_bytes(recipe.model.name, kind)
    if size is None:
        return
    bytes_now = 4 if recipe.model.dtype == "float32" else 2
    config = config or {}
    source_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    bytes_before = 2 if ("16" in source_dtype) else 4
    needed = size * bytes_now // bytes_before
    target = output
    while not target.exists():
        target = target.parent
    free = shutil.disk_usage(target).free
    if free < needed:
        raise UserError(f"not enough disk space for the export: about {needed / 2**30:.2f} GiB needed, "
                        f"{free / 2**30:.2f} GiB free in {target}; free some space or choose another output=DIR")


