"""Base class for every validated configuration block (recipe sections and method stages)."""

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors; values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Strict):
    """Fields every pruning stage has. A method's config subclasses this with `method: Literal[...]`."""

    method: str
    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of decoder-linear parameters to remove")


class StructuredStageConfig(StageConfig):
    """Fields shared by methods that remove KV groups and MLP channels (see compress.methods.base)."""

    damping: float = Field(0.01, gt=0, description="ridge damping of the least-squares compensation, x mean variance")
    covariance_token_stride: int = Field(4, ge=1, description="every n-th calibration token feeds the covariance")
    min_units: int = Field(1, ge=1, description="units of each kind always kept in every layer")
    round_to: int = Field(1, ge=1, description="kept MLP widths rounded to a multiple of this (8, 64, 128: fast "
                                              "kernels; 4 or 8 before an N:M stage)")
