"""Config fields shared by weight-level (mask) methods."""

from typing import Literal

from pydantic import Field, model_validator

from compress.config import StageConfig
from compress.ops.masks import parse_pattern


class WeightStageConfig(StageConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of zeros in every decoder linear")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N weights kept in every M inputs)")
    inputs: Literal["sequential", "dense"] = Field(
        "sequential", description="statistics from the already-pruned earlier layers (two passes per layer) "
                                  "or from the dense model (one pass per layer, faster)")
    owl: bool = Field(False, description="non-uniform layer sparsity from outlier ratios (OWL), unstructured only")
    owl_lambda: float = Field(0.08, gt=0.0, lt=0.5, description="OWL: layer sparsities stay within target +- lambda")
    owl_threshold: float = Field(5.0, gt=1.0, description="OWL: outlier = score above this multiple of the layer mean")

    @model_validator(mode="after")
    def _pattern_matches_sparsity(self):
        try:
            nm = parse_pattern(self.pattern)
        except Exception as err:  # UserError -> pydantic error naming the key
            raise ValueError(str(err)) from None
        if nm is not None:
            n, m = nm
            implied = 1 - n / m
            if abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"pattern {n}:{m} keeps {n} of every {m} weights, i.e. sparsity {implied:g}; "
                                 f"set sparsity={implied:g}")
        if self.owl and nm is not None:
            raise ValueError(f"owl=true sets a different sparsity per layer, which pattern {self.pattern} fixes at "
                             f"{1 - nm[0] / nm[1]:g}; use pattern=unstructured with owl")
        return self
