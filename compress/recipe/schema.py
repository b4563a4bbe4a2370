"""The recipe schema: model, calibration, ordered stages (one config class per method), export, eval.

Every block is `Strict` (unknown keys are errors); stages are a union discriminated by `method`.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator

from compress.config import DataSource, Strict
from compress.methods import METHODS


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
    # zero-shot accuracy through lm-eval-harness (pip install 'compress[eval]'): task names as lm-eval spells
    # them, folders or YAML files of your own tasks, examples per task (all when unset), shots, batch size
    tasks: list[str] = Field(default_factory=list)
    task_paths: list[str] = Field(default_factory=list)
    task_limit: int | None = Field(None, ge=1)
    num_fewshot: int = Field(0, ge=0)
    task_batch_size: int = Field(8, ge=1)

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
