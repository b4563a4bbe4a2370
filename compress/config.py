"""Base class for every validated configuration block (recipe sections and method stages)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from calibration.datasets import check_name
from compress.errors import UserError


class Strict(BaseModel):
    """Unknown keys are errors; values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Strict):
    """Fields every pruning stage has. A method's config subclasses this with `method: Literal[...]`."""

    method: str
    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of decoder-linear parameters to remove")

    def summary(self) -> str:
        """The stage in a few words (model card title)."""
        return f"{self.method} {self.sparsity:.0%}"

    def check_model(self, view, number: int, recipe) -> None:
        """Preflight: what this stage can check before any weight is loaded, against the model's config
        (`view`, a compress.arch.config_view.ConfigView), its place `number` and the whole `recipe`.
        Raise UserError naming the recipe key to fix. The default checks nothing."""


class StructuredStageConfig(StageConfig):
    """Fields shared by methods that remove KV groups and MLP channels (see compress.methods.base)."""

    damping: float = Field(0.01, gt=0, description="ridge damping of the least-squares compensation, x mean variance")
    covariance_token_stride: int = Field(4, ge=1, description="every n-th calibration token feeds the covariance")
    min_units: int = Field(1, ge=1, description="units of each kind always kept in every layer")
    round_to: int = Field(1, ge=1, description="kept MLP widths rounded to a multiple of this (8, 64, 128: fast "
                                              "kernels; 4 or 8 before an N:M stage)")


def source_for_file(path: str) -> str:
    """The data source a file path implies: 'jsonl' for .jsonl files, else 'text'."""
    return "jsonl" if str(path).endswith(".jsonl") else "text"


class DataSource(Strict):
    """Where a block's text comes from: a named data set (`builtin`), a text or jsonl file, or the Hub.

    `source: builtin` with `name: wikitext2` is the packaged WikiText-2 (works offline); see
    calibration.datasets for the other names. Paths are relative to the current folder.
    """

    source: Literal["builtin", "text", "jsonl", "hf"] = "builtin"
    name: str | None = Field("wikitext2", description="named data set for source=builtin: wikitext2 (packaged), "
                                                      "wikitext2-hf, c4 (Hugging Face Hub)")
    field: str = Field("text", description="jsonl/hf field holding plain text")
    dataset: str | None = Field(None, description="Hugging Face dataset for source=hf")
    dataset_config: str | None = None
    split: str = "train"

    @model_validator(mode="before")
    @classmethod
    def _source_from_path(cls, data):
        """A path given without a source means that file (so `path: my.txt` alone works)."""
        if isinstance(data, dict) and data.get(cls._file_key()) and "source" not in data:
            data = {**data, "source": source_for_file(data[cls._file_key()])}
        return data

    @model_validator(mode="after")
    def _check_name(self):
        if self.source == "builtin":

            if self.file is not None:
                raise ValueError(f"{self._file_key()} is set but source=builtin reads the named data set "
                                 f"'{self.name}'; set source=text (or jsonl) to read the file")
            try:
                check_name(self.name, "name")
            except UserError as err:
                raise ValueError(str(err).removeprefix("name: ")) from None
        return self

    @classmethod
    def _file_key(cls) -> str:
        """The subclass's field naming a file: `path` (calibration, recovery data) or `text` (eval)."""
        return "path"

    @property
    def file(self) -> str | None:
        return getattr(self, self._file_key())
