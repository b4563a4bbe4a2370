"""Base class for every validated configuration block (recipe sections and method stages)."""

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """Unknown keys are errors; values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Strict):
    """Fields every pruning stage has. A method's config subclasses this with `method: Literal[...]`."""

    method: str
    sparsity: float = Field(0.2, ge=0.0, lt=1.0, description="fraction of decoder-linear parameters to remove")
