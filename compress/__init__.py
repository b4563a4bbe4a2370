"""compress: prune large language models into smaller checkpoints that load with transformers.

Python API (the same recipe as the CLI):

    import compress
    recipe = compress.load_recipe("flap_20", ["model=smollm2-135m", "output=out/flap20"])
    report = compress.run(recipe)
    model = compress.load("out/flap20")
"""

__version__ = "0.1.0"

# The API functions import what they use when called, so `import compress` stays light (torch and
# transformers load on first use); everywhere else the package imports at module level.


def load_recipe(recipe, overrides=None):
    from compress.recipe import load_recipe as _load

    return _load(recipe, overrides)


def run(recipe, overrides=None, progress: bool = True, log=print):
    """Run a recipe (a `Recipe`, a YAML path, a packaged name or a dict) end to end; returns the report."""
    from compress.recipe import Recipe
    from compress.runner.pipeline import run as _run

    if not isinstance(recipe, Recipe) or overrides:
        recipe = load_recipe(recipe if not isinstance(recipe, Recipe) else recipe.model_dump(), overrides)
    return _run(recipe, progress=progress, log=log)


def load(path, dtype=None, semi_structured: bool = False):
    """Load a checkpoint written by compress (uniform or per-layer widths) without remote code.

    `semi_structured=True` (2:4 checkpoints, NVIDIA GPU with compute capability >= 8.0): move the
    model to the GPU in float16 (or `dtype`) and store every 2:4 linear as a
    `torch.sparse` semi-structured tensor so matmuls run on the sparse tensor cores. Elsewhere it
    stops with a message saying why; see `compress.export.semi_structured`.
    """
    import torch

    from compress.model.loading import load_pruned

    if semi_structured:
        from compress.export.semi_structured import convert, require_sparse_gpu

        require_sparse_gpu()  # fail before reading the weights
        model = load_pruned(path, dtype=dtype or torch.float16)
        convert(model, dtype or torch.float16)
        return model
    return load_pruned(path, dtype=dtype or torch.float32)
