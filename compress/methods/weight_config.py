"""Config fields shared by weight-level (mask) methods."""

from typing import Literal

from pydantic import Field, model_validator

from compress.config import StageConfig
from compress.errors import UserError
from compress.ops.masks import parse_pattern


class WeightStageConfig(StageConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of zeros in every decoder linear")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (N weights kept in every M inputs)")
    inputs: Literal["sequential", "dense"] = Field(
        "sequential", description="statistics from the already-pruned earlier layers (two passes per layer) "
                                  "or from the dense model (one pass per layer, faster)")
    within_layer: bool = Field(
        False, description="inputs: sequential only: prune q/k/v, o, the MLP inputs and down in turn, each "
                           "measured on the layer with the earlier ones already pruned (partial passes; the "
                           "attention's output is kept once o_proj is pruned, not recomputed)")
    sparsity_of: Literal["stage", "model"] = Field(
        "stage", description="stage: sparsity is the share of zeros in the weights this stage sees; model: the "
                             "share of the original model's decoder-linear parameters gone after it, counting "
                             "what earlier structured stages removed (e.g. experts), so a total is one number")
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
        if self.within_layer and self.inputs == "dense" and "within_layer" not in self.model_fields_set:
            self.within_layer = False  # a method's default (SparseGPT's) gives way to an explicit inputs=dense
        if self.within_layer and self.inputs == "dense":
            raise ValueError("within_layer=true measures each level on the pruned layer, inputs=dense on the dense "
                             "model: choose one")
        if self.sparsity_of == "model" and nm is not None:
            raise ValueError(f"pattern {self.pattern} fixes this stage's own sparsity; sparsity_of=model is for "
                             f"unstructured stages")
        if self.owl and nm is not None:
            raise ValueError(f"owl=true sets a different sparsity per layer, which pattern {self.pattern} fixes at "
                             f"{1 - nm[0] / nm[1]:g}; use pattern=unstructured with owl")
        return self

    def check_model(self, view, number: int, recipe) -> None:
        """N:M needs every input width to be a multiple of M, including widths earlier stages chose, and no
        structured stage may come after it."""
        nm = parse_pattern(self.pattern)
        if nm is None:
            return
        m = nm[1]
        for name, width in view.input_widths().items():
            if isinstance(width, int) and width % m:
                raise UserError(f"stage {number} ({self.method} {self.pattern}): the model's {name} {width} is "
                                f"not a multiple of M={m}; choose an N:M pattern whose M divides it")
        for later_number, later in enumerate(recipe.stages[number + 1:], number + 1):
            if hasattr(later, "round_to"):
                raise UserError(f"stage {later_number} ({later.method}) removes structures after the {self.pattern} "
                                f"stage {number}, which would break its pattern; put structured stages first")
        for before, earlier in enumerate(recipe.stages[:number]):
            round_to = getattr(earlier, "round_to", None)
            if round_to is not None and round_to % m:
                raise UserError(f"stage {number} ({self.method} {self.pattern}) needs MLP widths that are multiples "
                                f"of {m}, but stage {before} ({earlier.method}) may leave any width; set "
                                f"stages.{before}.round_to={m if m >= 8 else 8} (any multiple of {m})")
