"""`compress run`: load -> (dense eval) -> calibrate -> prune stage by stage -> eval -> export.

Everything that can be checked without weights (recipe, model source and architecture, data
files, output folder) is checked first, so a mistake fails in the first second and writes nothing.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import json
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

import compress
from calibration.capture import LayerwiseCapture
from calibration.data import calibration_windows, read_source_text, tokenize_text
from calibration.data import describe_source as describe_text
from calibration.datasets import is_packaged
from compress.arch import get_adapter, supported_model_types
from compress.errors import UserError
from compress.export.checkpoint import check_output_dir, layer_layout, write_checkpoint
from compress.methods import METHODS
from compress.methods.base import StageContext
from compress.model.evaluate import eval_windows, forward_tokens_per_second, generation_tokens_per_second, perplexity
from compress.model.loading import describe_source, load_model, read_config
from compress.model.memory import return_freed_memory_promptly
from compress.model.offload import is_offloaded, onloaded
from compress.model.processes import is_main_process
from compress.ops.slicing import decoder_linear_params
from compress.recipe import EvalConfig, ModelConfig, Recipe, dump_recipe
from compress.workdir import WorkFolder, recipe_fingerprint


def decoder_zero_fraction(adapter) -> float:
    """Fraction of exact zeros in the decoder linears (what weight-level masks produce)."""
    zeros = total = 0
    for index, layer in enumerate(adapter.layers()):
        with onloaded(layer, adapter.offload_store, f"layer-{index:04d}", write_back=False):
            for linear in adapter.decoder_linears(layer).values():
                zeros += int((linear.weight == 0).sum())
                total += linear.weight.numel()
    return zeros / total


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def preflight(recipe: Recipe, export: bool = True) -> Path | None:
    """Every check that needs no weights. Returns the output folder (or None when not exporting)."""
    kind, config = check_model(recipe.model)
    check_stage_order(recipe, config)
    cal = recipe.calibration
    if cal.source == "hf" and not cal.dataset:
        raise UserError("calibration.source=hf needs calibration.dataset=NAME")
    if cal.source == "hf" and cal.dataset in ("json", "text", "csv", "parquet") and cal.path \
            and not Path(cal.path).expanduser().is_file():
        raise UserError(f"calibration file not found: {cal.path} (data_files of the '{cal.dataset}' dataset builder)")
    if cal.source in ("text", "jsonl"):
        if not cal.path or not Path(cal.path).expanduser().is_file():
            raise UserError(f"calibration file not found: {cal.path}; set calibration.path=FILE, "
                            f"calibration.name=wikitext2 (shipped) or calibration=self (no data)")
    if cal.source in ("text", "jsonl") or (cal.source == "builtin" and is_packaged(cal.name)):
        text = read_source_text(cal)  # unreadable / invalid lines fail here
        if not text.strip():
            raise UserError(f"calibration file {cal.path} is empty: pruning needs calibration text; give a file with "
                            f"text in it or use calibration=self")
    check_eval(recipe.eval, config)
    check_not_eval_text(cal, "calibration", "calibration", recipe)
    check_context_length("calibration.seq_len", cal.seq_len, config)
    check_recovery_data(recipe, config)
    if not export:
        return None
    output = check_output_dir(recipe.export.output, recipe.export.overwrite)
    check_disk_space(recipe, kind, config, output)
    return output


def check_model(model: ModelConfig) -> tuple[str, dict | None]:
    """The model source exists and its architecture is supported: (source kind, config or None)."""
    kind = describe_source(model.name)
    config = read_config(model.name, kind, model.trust_remote_code)
    if config is not None and config.get("model_type") not in supported_model_types():
        raise UserError(f"unsupported architecture '{config.get('model_type')}' for {model.name}: "
                        f"supported model types are {', '.join(supported_model_types())}")
    return kind, config


def check_eval(evaluation: EvalConfig, config: dict | None, file_key: str = "eval.text") -> None:
    if evaluation.ppl == "none":
        return
    if evaluation.source in ("text", "jsonl") and not Path(evaluation.text or "").expanduser().is_file():
        skip = " or ppl=none" if file_key == "eval.text" else ""
        raise UserError(f"evaluation text not found: {evaluation.text}; set {file_key}=FILE{skip}")
    if evaluation.source == "hf" and not evaluation.dataset:
        raise UserError("eval.source=hf needs eval.dataset=NAME")
    check_context_length("eval.seq_len", evaluation.seq_len, config)


def text_digest(block, key: str, role: str) -> str | None:
    """SHA-256 of a data block's text when it is local (a file or a packaged set), else None."""
    if block.source not in ("text", "jsonl") and not (block.source == "builtin" and is_packaged(block.name)):
        return None
    if block.source != "builtin" and not Path(block.file or "").expanduser().is_file():
        return None
    return hashlib.sha256(read_source_text(block, key, role).encode()).hexdigest()


def check_not_eval_text(block, key: str, role: str, recipe: Recipe) -> None:
    """Calibrating or training on the evaluation text makes the perplexity meaningless: refuse it."""
    if recipe.eval.ppl == "none":
        return
    digest = text_digest(block, key, role)
    if digest is not None and digest == text_digest(recipe.eval, "eval", "eval"):
        raise UserError(f"{key} reads the evaluation text ({describe_text(recipe.eval)}): fitting weights on the "
                        f"test text makes the perplexity meaningless; use other text (e.g. {key}.name=wikitext2, "
                        f"its validation split)")


def check_recovery_data(recipe: Recipe, config: dict | None) -> None:
    """Recovery stages read an existing file that is not the evaluation text."""
    for number, stage in enumerate(recipe.stages):
        data = getattr(stage, "data", None)
        if data is None:
            continue
        check_context_length(f"stages.{number}.seq_len", stage.seq_len, config)
        if data.source == "hf":
            if not data.dataset:
                raise UserError(f"stages.{number}.data.source=hf needs stages.{number}.data.dataset=NAME")
            continue
        if data.source == "calibration":
            continue
        if data.source in ("text", "jsonl") and (not data.path or not Path(data.path).expanduser().is_file()):
            raise UserError(f"recovery data file not found: {data.path}; set stages.{number}.data.path=FILE "
                            f"or stages.{number}.data.name=wikitext2 (shipped)")
        check_not_eval_text(data, f"stages.{number}.data", "train", recipe)
        if data.template is not None and data.source in ("text", "builtin"):
            raise UserError(f"stages.{number}.data.template formats records: set data.source=jsonl or hf")


def check_context_length(key: str, length: int, config: dict | None) -> None:
    limit = (config or {}).get("text_config", config or {}).get("max_position_embeddings")
    if isinstance(limit, int) and length > limit:
        raise UserError(f"{key}={length} is longer than the model's context ({limit} positions); "
                        f"set {key}={min(limit, 2048)} or less")


def source_weight_bytes(name: str, kind: str) -> int | None:
    folder = Path(name).expanduser() if kind == "folder" else None
    if kind == "builtin":
        from compress.model.loading import cache_root
        folder = cache_root() / "models" / name
    if folder is None or not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None


def check_disk_space(recipe: Recipe, kind: str, config: dict | None, output: Path) -> None:
    """The export needs about the source's weight size (scaled to the recipe's dtype) free next to `output`."""
    size = source_weight_bytes(recipe.model.name, kind)
    if size is None:
        return
    bytes_now = 4 if recipe.model.dtype == "float32" else 2
    config = config or {}
    source_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    bytes_before = 2 if ("16" in source_dtype) else 4
    needed = size * bytes_now // bytes_before
    target = output
    while not target.exists():
        target = target.parent
    free = shutil.disk_usage(target).free
    if free < needed:
        raise UserError(f"not enough disk space for the export: about {needed / 2**30:.2f} GiB needed, "
                        f"{free / 2**30:.2f} GiB free in {target}; free some space or choose another output=DIR")


def nm_patterns(recipe: Recipe) -> tuple[tuple[int, int], ...]:
    """N:M patterns imposed by the recipe's stages (all must still hold in the saved checkpoint)."""
    from compress.ops.masks import parse_pattern

    found = (parse_pattern(s.pattern) for s in recipe.stages if hasattr(s, "pattern"))
    return tuple(sorted({nm for nm in found if nm is not None}))


def check_mlp_only_budgets(recipe: Recipe, config: dict | None) -> None:
    """A stage that prunes MLP channels only cannot remove more than the MLPs' share of the decoder linears."""
    text = (config or {}).get("text_config", config or {})
    try:
        hidden = int(text["hidden_size"])
        # MoE: every expert's MLP counts (a mixed model's dense layers are not; the stage re-checks when loaded)
        experts = int(text.get("num_local_experts") or text.get("num_experts") or 1)
        inter = experts * int(text.get("moe_intermediate_size") or text["intermediate_size"])
        heads, kv = (int(text["num_attention_heads"]),
                     int(text.get("num_key_value_heads") or text["num_attention_heads"]))
        head_dim = int(text.get("head_dim") or hidden // heads)
    except (KeyError, TypeError, ValueError):
        return
    mlp = 3 * hidden * inter
    share = mlp / (mlp + 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim)
    for number, stage in enumerate(recipe.stages):
        if getattr(stage, "targets", None) == "mlp" and stage.sparsity >= share:
            raise UserError(f"stage {number} ({stage.method}) removes {stage.sparsity:.0%} of the decoder linears from "
                            f"the MLPs alone, which hold {share:.0%}; use stages.{number}.targets=both or a lower "
                            f"sparsity")


def check_stage_order(recipe: Recipe, config: dict | None) -> None:
    """N:M stages need every input width to be a multiple of M, including widths earlier stages chose."""
    from compress.ops.masks import parse_pattern

    check_mlp_only_budgets(recipe, config)
    for number, stage in enumerate(recipe.stages):
        nm = parse_pattern(stage.pattern) if hasattr(stage, "pattern") else None
        if nm is None:
            continue
        m = nm[1]
        if config is not None:
            text = config.get("text_config", config)
            heads = text.get("num_attention_heads")
            head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else 0)
            widths = {"hidden_size": text.get("hidden_size"), "intermediate_size": text.get("intermediate_size"),
                      "moe_intermediate_size": text.get("moe_intermediate_size"), "head_dim": head_dim or None}
            for name, width in widths.items():
                if isinstance(width, int) and width % m:
                    raise UserError(f"stage {number} ({stage.method} {stage.pattern}): the model's {name} {width} is "
                                    f"not a multiple of M={m}; choose an N:M pattern whose M divides it")
        for later_number, later in enumerate(recipe.stages[number + 1:], number + 1):
            if hasattr(later, "round_to"):
                raise UserError(f"stage {later_number} ({later.method}) removes structures after the {stage.pattern} "
                                f"stage {number}, which would break its pattern; put structured stages first")
        for before, earlier in enumerate(recipe.stages[:number]):
            round_to = getattr(earlier, "round_to", None)
            if round_to is not None and round_to % m:
                raise UserError(f"stage {number} ({stage.method} {stage.pattern}) needs MLP widths that are multiples "
                                f"of {m}, but stage {before} ({earlier.method}) may leave any width; set "
                                f"stages.{before}.round_to={m if m >= 8 else 8} (any multiple of {m})")


class _Progress:
    """tqdm bars on stderr; silent when disabled (tests, API use with progress=False)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def make(self, description: str, total: int, unit: str):
        return tqdm(total=total, desc=description, unit=unit, disable=not self.enabled, leave=False,
                    dynamic_ncols=True)

    @contextmanager
    def bar(self, description: str, total: int, unit: str):
        bar = self.make(description, total, unit)
        try:
            yield bar.update
        finally:
            bar.close()


def model_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _versions() -> dict:
    versions = {"python": __import__("platform").python_version()}
    for package in ("compress", "torch", "transformers", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = getattr(compress, "__version__", None) if package == "compress" else None
    return versions


def evaluate_ppl(model, tokenizer, evaluation: EvalConfig, progress: _Progress, label: str,
                 test_ids=None) -> float | None:
    if evaluation.ppl == "none":
        return None
    if test_ids is None:
        test_ids = tokenize_text(tokenizer, read_source_text(evaluation, "eval", "eval"))
    windows = eval_windows(test_ids, evaluation.seq_len, evaluation.ppl)
    with progress.bar(f"ppl {label}", len(windows), "win") as update:
        return perplexity(model, windows, update)


def run(recipe: Recipe, progress: bool = True, log=print, export: bool = True, release_model: bool = True) -> dict:
    """Run a validated recipe end to end. Returns the report (also written as report.json).

    The pruned model's weights are released once written (`release_model`), so the reload check
    never holds two models; load the result with `compress.load(output)`.
    With `model.device_map` / `model.max_memory`, layers that do not fit stay on disk and are
    handled one at a time (compress.model.offload); their working copies live in a temporary folder
    under `model.offload_folder` (default: the system's temporary folder), removed at the end.
    """
    if not recipe.model.offloading:
        return _run(recipe, progress, log, export, release_model, None)
    parent = Path(recipe.model.offload_folder).expanduser() if recipe.model.offload_folder else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compress-offload-", dir=parent) as store:
        return _run(recipe, progress, log, export, release_model, Path(store))


def _run(recipe: Recipe, progress: bool, log, export: bool, release_model: bool, store: Path | None) -> dict:
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    output = preflight(recipe, export)
    return_freed_memory_promptly()
    bars = _Progress(progress)
    seconds: dict[str, float] = {}
    peak_by_phase: dict[str, float] = {}  # process peak RSS (MiB) at the end of each phase
    report: dict = {"compress_version": compress.__version__, "model": recipe.model.name}

    start = time.perf_counter()
    log(f"loading {recipe.model.name}")
    placement = None
    if store is not None:
        max_memory = dict(recipe.model.max_memory) if recipe.model.max_memory else None  # accelerate edits it
        placement = {"device_map": recipe.model.device_map or "auto", "max_memory": max_memory,
                     "offload_folder": str(store / "accelerate")}
    model, tokenizer = load_model(recipe.model.name, recipe.model.dtype, recipe.model.trust_remote_code,
                                  recipe.model.revision, placement)
    adapter = get_adapter(model)
    adapter.check_supported()
    if store is not None:
        from compress.model.offload import OFFLOAD_MMAP_THRESHOLD

        return_freed_memory_promptly(OFFLOAD_MMAP_THRESHOLD)
        model.compress_offload_store = store / "layers"
        on_disk = sum(is_offloaded(layer) for layer in adapter.layers())
        log(f"{on_disk} of {adapter.num_layers()} decoder layers on disk; each is read into memory only while "
            f"it is calibrated and pruned")
    seconds["load"] = time.perf_counter() - start
    peak_by_phase["load"] = peak_rss_mib()

    params_before = model_params(model)
    linear_before = decoder_linear_params(adapter)
    ppl = {"windows": recipe.eval.ppl, "seq_len": recipe.eval.seq_len, "text": describe_text(recipe.eval)}
    speed = {}
    test_ids = None
    if recipe.eval.ppl != "none":
        test_ids = tokenize_text(tokenizer, read_source_text(recipe.eval, "eval", "eval"))
    if not is_main_process():  # under `accelerate launch`: the main process alone writes
        export = False
    work = None
    if export and recipe.resume:
        work = WorkFolder(output.parent / f".{output.name}.work", recipe_fingerprint(recipe), log)
        if work.resumed:
            log(f"resuming from {work.path}")
    if recipe.eval.dense:
        start = time.perf_counter()
        ppl["dense"] = evaluate_ppl(model, tokenizer, recipe.eval, bars, "dense", test_ids)
        if recipe.eval.speed:
            speed["dense_forward_tokens_per_s"] = forward_tokens_per_second(model)
            speed["dense_generate_tokens_per_s"] = generation_tokens_per_second(model)
        seconds["dense_eval"] = time.perf_counter() - start
        peak_by_phase["dense_eval"] = peak_rss_mib()
        if ppl["dense"] is not None:
            log(f"dense ppl {ppl['dense']:.2f}")

    prune_start = time.perf_counter()
    cal = recipe.calibration
    log(f"calibration: {cal.num_samples} x {cal.seq_len} tokens from {describe_text(cal)}")
    saved_windows = work.load("calibration") if work is not None else None
    if saved_windows is not None:
        windows = saved_windows[0]["windows"]
    else:
        with bars.bar("calibration data", cal.num_samples, "seq") as update:
            windows = calibration_windows(cal, model, tokenizer, progress=update)
        if work is not None:
            work.save("calibration", {"windows": windows})
    seconds["calibration_data"] = time.perf_counter() - prune_start
    peak_by_phase["calibration_data"] = peak_rss_mib()

    stage_reports = []
    artifacts: dict[str, bytes | str] = {}  # extra export files from stages (e.g. a LoRA adapter)

    def evaluate_now(label: str) -> float | None:
        return evaluate_ppl(model, tokenizer, recipe.eval, bars, label, test_ids)

    for number, stage in enumerate(recipe.stages):
        stage_start = time.perf_counter()
        method = METHODS[stage.method](stage)

        open_bars = []

        def new_capture(passes: int, _number=number, _stage=stage):
            total = passes * adapter.num_layers() * len(windows)
            open_bars.append(bars.make(f"stage {_number} {_stage.method}", total, "seq"))
            return LayerwiseCapture(adapter, windows, cal.batch_size, progress=open_bars[-1].update)

        def make_bar(description: str, total: int, unit: str, _number=number, _stage=stage):
            open_bars.append(bars.make(f"stage {_number} {_stage.method}: {description}", total, unit))
            return open_bars[-1]

        folder = work.stage(number) if work is not None else None
        details = folder.restore_result(adapter) if folder is not None else None
        if details is not None:  # a resumed run: this stage completed before the interruption
            artifacts.update(folder.load_artifacts())
            log(f"stage {number} ({stage.method}) restored from {folder.path}")
        else:
            ctx = StageContext(adapter=adapter, new_capture=new_capture, log=log, windows=windows,
                               make_bar=make_bar, folder=folder, tokenizer=tokenizer,
                               evaluate=evaluate_now if recipe.eval.ppl != "none" else None,
                               previous=list(stage_reports), artifacts={})
            try:
                details = method.run(ctx) or {}
            finally:
                for bar in open_bars:
                    bar.close()
            artifacts.update(ctx.artifacts)
            if folder is not None:
                folder.save_artifacts(ctx.artifacts)
                folder.save_result(adapter, details)
        seconds[f"stage_{number}_{stage.method}"] = time.perf_counter() - stage_start
        stage_reports.append({"method": stage.method, "config": stage.model_dump(mode="json"), **details})
        log(f"stage {number} ({stage.method}) done in {seconds[f'stage_{number}_{stage.method}']:.1f}s")
    seconds["prune"] = time.perf_counter() - prune_start
    peak_by_phase["prune"] = peak_rss_mib()

    linear_after = decoder_linear_params(adapter)
    params_after = model_params(model)
    if recipe.eval.ppl != "none":
        start = time.perf_counter()
        ppl["pruned"] = evaluate_ppl(model, tokenizer, recipe.eval, bars, "pruned", test_ids)
        if recipe.eval.speed:
            speed["pruned_forward_tokens_per_s"] = forward_tokens_per_second(model)
            speed["pruned_generate_tokens_per_s"] = generation_tokens_per_second(model)
            if "dense_forward_tokens_per_s" in speed:
                speed["forward_speedup"] = speed["pruned_forward_tokens_per_s"] / speed["dense_forward_tokens_per_s"]
                speed["generate_speedup"] = speed["pruned_generate_tokens_per_s"] / speed["dense_generate_tokens_per_s"]
        seconds["pruned_eval"] = time.perf_counter() - start
        peak_by_phase["pruned_eval"] = peak_rss_mib()
        log(f"pruned ppl {ppl['pruned']:.2f}")

    report.update({
        "stages": stage_reports,
        "layers": [{"index": i, **entry} for i, entry in enumerate(layer_layout(adapter))],
        "params": {"total_before": params_before, "total_after": params_after,
                   "decoder_linear_before": linear_before, "decoder_linear_after": linear_after},
        "sparsity": {"targets": [s.sparsity for s in recipe.stages if METHODS[s.method].prunes],
                     "achieved_decoder_linear": 1 - linear_after / linear_before,
                     "zero_fraction_decoder_linear": decoder_zero_fraction(adapter)},
        "ppl": ppl,
        "speed": speed,
        "seconds": seconds,
        "versions": _versions(),
    })

    if export:
        gc.collect()
        start = time.perf_counter()

        def finalize(facts: dict) -> dict[str, str]:
            seconds["export"] = time.perf_counter() - start
            peak_by_phase["export"] = peak_rss_mib()
            report["export"] = {"output": str(output), **facts}
            report["peak_rss_mib"] = peak_rss_mib()
            report["peak_rss_mib_by_phase"] = peak_by_phase
            return {"report.json": json.dumps(report, indent=2) + "\n", "recipe.yaml": dump_recipe(recipe),
                    "README.md": model_card(recipe, report), **artifacts}

        log(f"writing {output}")
        write_checkpoint(model, tokenizer, adapter, output, overwrite=recipe.export.overwrite,
                         max_shard_size=recipe.export.max_shard_size, finalize=finalize,
                         verify=recipe.export.verify, tolerance=recipe.export.verify_tolerance,
                         release_model=release_model, nm_patterns=nm_patterns(recipe), placement=placement,
                         nm_exempt=frozenset(key for stage in stage_reports
                                             for key in stage.get("untouched_no_calibration_tokens", [])))
        if work is not None:
            work.remove()
    report["peak_rss_mib"] = peak_rss_mib()
    return report


def model_card(recipe: Recipe, report: dict) -> str:
    ppl = report["ppl"]
    params = report["params"]
    stages = ", ".join(f"{s.method} {s.sparsity:.0%}" if METHODS[s.method].prunes else f"{s.method} recovery"
                       for s in recipe.stages)
    load = ("from transformers import AutoModelForCausalLM\n"
            "model = AutoModelForCausalLM.from_pretrained(\"PATH\""
            f"{', trust_remote_code=True' if report['export']['trust_remote_code_needed'] else ''})")
    rows = [f"| parameters | {params['total_before']:,} | {params['total_after']:,} |",
            f"| decoder-linear parameters | {params['decoder_linear_before']:,} | {params['decoder_linear_after']:,} |"]
    if ppl.get("pruned") is not None:
        dense = f"{ppl['dense']:.2f}" if ppl.get("dense") is not None else "–"
        rows.append(f"| perplexity ({ppl['windows']}, {ppl['seq_len']} tokens, {ppl['text']}) | "
                    f"{dense} | {ppl['pruned']:.2f} |")
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags: [pruned, compress]",
        "---",
        f"# {Path(str(recipe.model.name)).name} pruned with compress ({stages})",
        "",
        f"Pruned from `{recipe.model.name}` by `compress run` "
        f"({report['sparsity']['achieved_decoder_linear']:.1%} of the decoder-linear parameters removed).",
        "The exact recipe is in `recipe.yaml`, every measurement in `report.json`.",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        *rows,
        "",
        "## Load",
        "",
        "```python",
        load,
        "```",
        "",
        ("The layers have different widths, so the checkpoint ships `modeling_pruned.py` (read it before "
         "enabling remote code), or load it without remote code via `compress.load(\"PATH\")`."
         if report["export"]["trust_remote_code_needed"] else
         "Every layer has the same width, so the stock architecture class loads it."),
        "",
    ])
