"""The stage loop: each stage of the recipe runs on the model in place, or is restored from the work
folder when an interrupted run already finished it."""

from __future__ import annotations

import time

from calibration.capture import LayerwiseCapture
from compress.methods import METHODS
from compress.methods.base import StageContext, StageResult
from compress.ops.slicing import layer_linear_tensors, set_layer_linears


def run_stages(state) -> None:
    """Run every stage on `state.adapter` (a runner.pipeline.RunState); results go to `state.results`."""
    for number, stage in enumerate(state.recipe.stages):
        start = time.perf_counter()
        folder = state.work.stage(number) if state.work is not None else None
        details = restore_finished(folder, state.adapter) if folder is not None else None
        if details is not None:  # a resumed run: this stage completed before the interruption
            state.artifacts.update(folder.load_artifacts())
            state.log(f"stage {number} ({stage.method}) restored from {folder.path}")
        else:
            details, artifacts = _run_stage(state, number, stage, folder)
            state.artifacts.update(artifacts)
            if folder is not None:
                folder.save_artifacts(artifacts)
                save_finished(folder, state.adapter, details)
        key = f"stage_{number}_{stage.method}"
        state.seconds[key] = time.perf_counter() - start
        state.results.append(StageResult(stage.method, stage.model_dump(mode="json"), details))
        state.log(f"stage {number} ({stage.method}) done in {state.seconds[key]:.1f}s")


def _run_stage(state, number: int, stage, folder) -> tuple[dict, dict]:
    """One stage's `run` with its context: captures and bars named after the stage, closed at the end."""
    adapter, windows, bars = state.adapter, state.windows, state.bars
    open_bars = []

    def new_capture(passes: int):
        total = passes * adapter.num_layers() * len(windows)
        open_bars.append(bars.make(f"stage {number} {stage.method}", total, "seq"))
        return LayerwiseCapture(adapter, windows, state.recipe.calibration.batch_size, progress=open_bars[-1].update)

    def make_bar(description: str, total: int, unit: str):
        open_bars.append(bars.make(f"stage {number} {stage.method}: {description}", total, unit))
        return open_bars[-1]

    ctx = StageContext(adapter=adapter, new_capture=new_capture, log=state.log, windows=windows,
                       calibration_batch_size=state.recipe.calibration.batch_size,
                       make_bar=make_bar, folder=folder, tokenizer=state.tokenizer,
                       evaluate=state.evaluate if state.recipe.eval.ppl != "none" else None,
                       previous=list(state.results), artifacts={}, linear_before=state.report.get("linear_before"))
    try:
        details = METHODS[stage.method](stage).run(ctx) or {}
    finally:
        for bar in open_bars:
            bar.close()
    return details, ctx.artifacts


def save_finished(folder, adapter, details: dict) -> None:
    """Every layer's decoder linears (one file per layer, so memory stays flat), then the stage's marker."""
    for index, layer in enumerate(adapter.layers()):
        with adapter.onloaded(index, write_back=False):
            folder.save(f"final-{index:04d}", layer_linear_tensors(adapter, layer))
    folder.mark_finished(details)


def restore_finished(folder, adapter) -> dict | None:
    """Put a finished stage's layers back into the model; its report details, or None if unfinished."""
    details = folder.finished_details()
    if details is None:
        return None
    for index, layer in enumerate(adapter.layers()):
        with adapter.onloaded(index):
            set_layer_linears(adapter, layer, folder.load(f"final-{index:04d}")[0])
    return details
