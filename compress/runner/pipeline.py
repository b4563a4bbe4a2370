"""`compress run`: preflight -> load -> dense eval -> calibration windows -> stages -> eval -> export.

Everything that can be checked without weights is checked first (compress.recipe.preflight), so a
mistake fails in the first second and writes nothing. `run` reads as that list of phases; each
phase is a small function over one `RunState`.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import compress
from calibration.data import calibration_windows, describe_data, read_source_text, tokenize_text
from compress.arch import get_adapter
from compress.arch.moe import model_experts, routed_experts
from compress.export.card import layers_png, model_card
from compress.export.checkpoint import layer_layout, write_checkpoint
from compress.methods import METHODS
from compress.methods.base import StageResult
from compress.model.evaluate import (
    evaluate_ppl,
    forward_tokens_per_second,
    generation_tokens_per_second,
    scores_line,
    task_scores,
)
from compress.model.loading import load_model
from compress.model.memory import return_freed_memory_promptly
from compress.model.offload import OFFLOAD_MMAP_THRESHOLD, is_offloaded
from compress.model.processes import is_main_process
from compress.ops.masks import parse_pattern
from compress.ops.slicing import decoder_linear_params
from compress.progress import Progress
from compress.recipe import Recipe, dump_recipe
from compress.recipe.preflight import preflight
from compress.runner.report import layer_params, layer_shares, model_params, peak_rss_mib, versions
from compress.runner.stages import run_stages
from compress.workdir import WorkFolder, recipe_fingerprint


@dataclass
class RunState:
    """What the phases of one run share."""

    recipe: Recipe
    log: object
    bars: Progress
    export: bool
    release_model: bool
    store: Path | None  # working copies of disk-offloaded layers (None: everything in memory)
    output: Path | None = None
    model: object = None
    tokenizer: object = None
    adapter: object = None
    placement: dict | None = None
    work: WorkFolder | None = None
    test_ids: torch.Tensor | None = None
    windows: torch.Tensor | None = None
    results: list[StageResult] = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)  # extra export files from stages (e.g. a LoRA adapter)
    seconds: dict = field(default_factory=dict)
    peak_by_phase: dict = field(default_factory=dict)  # process peak RSS (MiB) at the end of each phase
    ppl: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)  # lm-eval accuracy: {"dense"|"pruned": {task: {metric: value}}}
    report: dict = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, since: float | None = None):
        """Time a phase (from `since` if given) and note the memory peak at its end."""
        start = time.perf_counter() if since is None else since
        yield
        self.seconds[name] = time.perf_counter() - start
        self.peak_by_phase[name] = peak_rss_mib()

    def evaluate(self, label: str) -> float | None:
        return evaluate_ppl(self.model, self.tokenizer, self.recipe.eval, self.bars, label, self.test_ids)


def run(recipe: Recipe, progress: bool = True, log=print, export: bool = True, release_model: bool = True) -> dict:
    """Run a validated recipe end to end. Returns the report (also written as report.json).

    The pruned model's weights are released once written (`release_model`), so the reload check
    never holds two models; load the result with `compress.load(output)`.
    With `model.device_map` / `model.max_memory`, layers that do not fit stay on disk and are
    handled one at a time (compress.model.offload); their working copies live in a temporary folder
    under `model.offload_folder` (default: the system's temporary folder), removed at the end.
    """
    with offload_store(recipe) as store:
        if recipe.threads:
            torch.set_num_threads(recipe.threads)
        state = RunState(recipe, log, Progress(progress), export, release_model, store)
        state.output = preflight(recipe, export)
        return_freed_memory_promptly()
        load(state)
        with routed_experts(model_experts(state.adapter)):  # MoE: experts run through their views
            open_work_folder(state)
            if recipe.eval.dense:
                measure(state, "dense")
            prune_start = time.perf_counter()
            with state.phase("calibration_data"):
                calibrate(state)
            with state.phase("prune", since=prune_start):
                run_stages(state)
            if recipe.eval.ppl != "none" or recipe.eval.tasks:
                measure(state, "pruned")
            build_report(state)
            if state.export:
                write(state)
        state.report["peak_rss_mib"] = peak_rss_mib()
        return state.report


@contextmanager
def offload_store(recipe: Recipe):
    """A temporary folder for disk-offloaded layers when the recipe offloads, else None."""
    if not recipe.model.offloading:
        yield None
        return
    parent = Path(recipe.model.offload_folder).expanduser() if recipe.model.offload_folder else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compress-offload-", dir=parent) as store:
        yield Path(store)


def load(state: RunState) -> None:
    """The model, its tokenizer and adapter; offloaded layers stay on disk; the evaluation text tokenized."""
    recipe, store = state.recipe, state.store
    with state.phase("load"):
        state.log(f"loading {recipe.model.name}")
        if store is not None:
            max_memory = dict(recipe.model.max_memory) if recipe.model.max_memory else None  # accelerate edits it
            state.placement = {"device_map": recipe.model.device_map or "auto", "max_memory": max_memory,
                               "offload_folder": str(store / "accelerate")}
        state.model, state.tokenizer = load_model(recipe.model.name, recipe.model.dtype,
                                                  recipe.model.trust_remote_code, recipe.model.revision,
                                                  state.placement)
        state.adapter = get_adapter(state.model, store / "layers" if store is not None else None)
        state.adapter.check_supported()
        if store is not None:

            return_freed_memory_promptly(OFFLOAD_MMAP_THRESHOLD)
            on_disk = sum(is_offloaded(layer) for layer in state.adapter.layers())
            state.log(f"{on_disk} of {state.adapter.num_layers()} decoder layers on disk; each is read into "
                      f"memory only while it is calibrated and pruned")
    state.report = {"compress_version": compress.__version__, "model": recipe.model.name,
                    "params_before": model_params(state.model),
                    "linear_before": decoder_linear_params(state.adapter),
                    "layers_before": layer_params(state.adapter)}
    state.ppl = {"windows": recipe.eval.ppl, "seq_len": recipe.eval.seq_len, "text": describe_data(recipe.eval)}
    if recipe.eval.ppl != "none":
        state.test_ids = tokenize_text(state.tokenizer, read_source_text(recipe.eval, "eval", "eval"))


def open_work_folder(state: RunState) -> None:
    """Resumable progress beside the output (the main process alone writes under `accelerate launch`)."""
    if not is_main_process():
        state.export = False
    if state.export and state.recipe.resume:
        output = state.output
        state.work = WorkFolder(output.parent / f".{output.name}.work", recipe_fingerprint(state.recipe), state.log)
        if state.work.resumed:
            state.log(f"resuming from {state.work.path}")


def measure(state: RunState, label: str) -> None:
    """Perplexity (and, with eval.speed, tokens/s) of the model as it is now: 'dense' or 'pruned'."""
    with state.phase(f"{label}_eval"):
        state.ppl[label] = state.evaluate(label)
        if state.recipe.eval.speed:
            state.speed[f"{label}_forward_tokens_per_s"] = forward_tokens_per_second(state.model)
            state.speed[f"{label}_generate_tokens_per_s"] = generation_tokens_per_second(state.model)
            if label == "pruned" and "dense_forward_tokens_per_s" in state.speed:
                for kind in ("forward", "generate"):
                    state.speed[f"{kind}_speedup"] = (state.speed[f"pruned_{kind}_tokens_per_s"]
                                                      / state.speed[f"dense_{kind}_tokens_per_s"])
        if state.recipe.eval.tasks:  # lm-eval's task index is built once per process (evaluate.task_manager)
            state.tasks[label] = task_scores(state.model, state.tokenizer, state.recipe.eval)
    if state.ppl[label] is not None:
        state.log(f"{label} ppl {state.ppl[label]:.2f}")
    for task, scores in state.tasks.get(label, {}).items():
        state.log(f"{label} {task} {scores_line(scores)}")


def calibrate(state: RunState) -> None:
    """The calibration windows: restored from the work folder, or drawn (or generated) and saved there."""
    cal, work = state.recipe.calibration, state.work
    state.log(f"calibration: {cal.num_samples} x {cal.seq_len} tokens from {describe_data(cal)}")
    saved = work.load("calibration") if work is not None else None
    if saved is not None:
        state.windows = saved[0]["windows"]
        return
    with state.bars.bar("calibration data", cal.num_samples, "seq") as update:
        state.windows = calibration_windows(cal, state.model, state.tokenizer, progress=update)
    if work is not None:
        work.save("calibration", {"windows": state.windows})


def build_report(state: RunState) -> None:
    recipe, adapter = state.recipe, state.adapter
    linear_before, params_before = state.report.pop("linear_before"), state.report.pop("params_before")
    linear_after = decoder_linear_params(adapter)
    before, after = state.report.pop("layers_before"), layer_params(adapter)
    state.report.update({
        "stages": [result.report() for result in state.results],
        "layers": [{"index": i, **entry, **layer_shares(before[i], after[i])}
                   for i, entry in enumerate(layer_layout(adapter))],
        "params": {"total_before": params_before, "total_after": model_params(state.model),
                   "decoder_linear_before": linear_before, "decoder_linear_after": linear_after},
        "sparsity": {"targets": [s.sparsity for s in recipe.stages if METHODS[s.method].prunes],
                     "achieved_decoder_linear": 1 - linear_after / linear_before,
                     "zero_fraction_decoder_linear": sum(r["zeros"] for r in after) / max(linear_after, 1)},
        "ppl": state.ppl,
        "speed": state.speed,
        **({"tasks": {"names": list(recipe.eval.tasks), "num_fewshot": recipe.eval.num_fewshot,
                      "limit": recipe.eval.task_limit, **state.tasks}} if recipe.eval.tasks else {}),
        "seconds": state.seconds,
        "versions": versions(),
    })


def nm_patterns(recipe: Recipe) -> tuple[tuple[int, int], ...]:
    """N:M patterns imposed by the recipe's stages (all must still hold in the saved checkpoint)."""
    found = (parse_pattern(s.pattern) for s in recipe.stages if hasattr(s, "pattern"))
    return tuple(sorted({nm for nm in found if nm is not None}))


def write(state: RunState) -> None:
    """The checkpoint, with report.json, recipe.yaml and the model card; then the work folder goes."""
    recipe, report, output = state.recipe, state.report, state.output
    gc.collect()
    start = time.perf_counter()

    def finalize(facts: dict) -> dict[str, str]:
        state.seconds["export"] = time.perf_counter() - start
        state.peak_by_phase["export"] = peak_rss_mib()
        report["export"] = {"output": str(output), **facts}
        report["peak_rss_mib"] = peak_rss_mib()
        report["peak_rss_mib_by_phase"] = state.peak_by_phase
        return {"report.json": json.dumps(report, indent=2) + "\n", "recipe.yaml": dump_recipe(recipe),
                "README.md": model_card(recipe, report, state.artifacts), "layers.png": layers_png(report),
                **state.artifacts}

    state.log(f"writing {output}")
    write_checkpoint(state.model, state.tokenizer, state.adapter, output, overwrite=recipe.export.overwrite,
                     max_shard_size=recipe.export.max_shard_size, finalize=finalize,
                     verify=recipe.export.verify, tolerance=recipe.export.verify_tolerance,
                     release_model=state.release_model, nm_patterns=nm_patterns(recipe),
                     placement=state.placement,
                     nm_exempt=frozenset(key for result in state.results for key in result.untouched))
    if state.work is not None:
        state.work.remove()
