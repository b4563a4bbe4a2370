"""What every pruning method shares: `Method` (a config and a `run`), the `StageContext` a stage gets
from the runner, and the per-layer score record of structured methods.

The two families build on it: `compress.methods.structured.StructuredMethod` (remove KV groups and MLP
channels) and `compress.methods.weight.WeightMethod` (zero single weights); a method that needs its
own loop (LoRA recovery) subclasses `Method` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from compress.arch.base import Adapter
from compress.config import StageConfig
from compress.ops.allocation import UnitScores
from compress.ops.masks import parse_pattern
from compress.workdir import StageFolder

# Experts' widths are multiples of this: transformers' default (grouped matmul) experts forward needs
# every weight row stride to be a multiple of 16 bytes, i.e. 8 bfloat16 / 4 float32 values.
EXPERT_WIDTH_MULTIPLE = 8


@dataclass
class LayerScores:
    units: list[UnitScores]
    # How each output projection ("attention" -> o_proj, "mlp" -> down_proj, "mlp.<e>" -> expert
    # e's down projection) is compensated.
    compensation: dict[str, object] = field(default_factory=dict)
    # Scalars measured on the whole layer (e.g. CFSP's angular distance), from `observe_layer`.
    block: dict[str, float] = field(default_factory=dict)
    # Mixture-of-experts layers: every expert's channels, best first [experts, width], and the
    # experts that received no calibration token (see `StructuredMethod.expert_scores`).
    expert_order: torch.Tensor | None = None
    idle_experts: list[int] = field(default_factory=list)


@dataclass
class StageResult:
    """What a finished stage tells the stages after it, the export and the report.

    `details` is what the method's `run` returned; the report gets it unchanged, after `method` and
    `config`. The properties name what later stages read from it.
    """

    method: str
    config: dict  # the stage's config as JSON
    details: dict

    @property
    def pattern(self) -> tuple[int, int] | None:
        """The N:M pattern this stage imposed (None: unstructured, or not a weight stage)."""

        return parse_pattern(self.config["pattern"]) if "pattern" in self.config else None

    @property
    def masks_weights(self) -> bool:
        """True for weight-level stages, whose zeros a later dense update (a LoRA merge) must keep."""
        return "pattern" in self.config

    @property
    def block_importance(self) -> list[float] | None:
        """Per-layer importance measured by the stage (CFSP), if any."""
        return self.details.get("block_importance")

    @property
    def untouched(self) -> list[str]:
        """Linears the stage left as they were (experts that saw no calibration token)."""
        return list(self.details.get("untouched_no_calibration_tokens", []))

    def report(self) -> dict:
        return {"method": self.method, "config": self.config, **self.details}


@dataclass
class StageContext:
    """What a stage gets from the pipeline: the model's adapter and a way to start a capture."""

    adapter: Adapter
    new_capture: callable  # (passes: int) -> LayerwiseCapture
    log: callable = print
    folder: StageFolder | None = None  # resumable progress of this stage (see compress.workdir)
    windows: torch.Tensor | None = None  # calibration token ids [samples, seq_len]
    calibration_batch_size: int = 4  # windows per forward of a capture (the recipe's calibration.batch_size)
    make_bar: callable = None  # (description, total, unit) -> tqdm-like bar with update()/close()
    tokenizer: object = None
    evaluate: callable = None  # (label) -> perplexity of the model as it is now, under the recipe's eval
    previous: list[StageResult] = field(default_factory=list)  # the stages that ran before this one
    artifacts: dict = field(default_factory=dict)  # extra files for the export: relative path -> bytes | str
    linear_before: int | None = None  # decoder-linear parameters of the model as loaded (before any stage)


class Method(ABC):
    """A pruning method: a validated config (`Config`) and a `run` that prunes the model in place."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]]
    prunes: ClassVar[bool] = True  # False for stages that only train (recovery)

    def __init__(self, config: StageConfig):
        self.config = config

    @abstractmethod
    def run(self, ctx: StageContext) -> dict:
        """Prune `ctx.adapter.model` in place; return details for the report."""
