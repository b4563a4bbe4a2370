"""The `compress` command line (typer). Arguments are `recipe=NAME_OR_PATH` and `key=value` only.

    compress run recipe=flap_20 model=smollm2-135m output=out/flap20
    compress eval model=out/flap20 ppl=quick
    compress validate recipe=flap_20 stages.0.sparsity=0.3
    compress print recipe=flap_20
    compress ls
    compress cp flap_20 my_recipe.yaml
    compress push out/flap20 me/smollm2-flap20        # to the Hugging Face Hub, private unless --public
    compress eval model=out/flap20 baseline=out/flap20/report.json max_ratio=1.02   # a perplexity gate for CI
    compress gguf out/flap20                           # out/flap20/model-f16.gguf for llama.cpp
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune large language models into smaller checkpoints that load with transformers.")

ARGS = typer.Argument(None, help="recipe=NAME_OR_PATH and key=value overrides (dotted paths, list indices)")
DEBUG = typer.Option(False, "--debug", help="show full tracebacks")


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _guard(debug: bool, action):
    from compress.errors import NumericalError, UserError

    _quiet_libraries()
    try:
        return action()
    except typer.Exit:
        raise
    except UserError as err:
        if debug:
            raise
        _fail(str(err))
    except NumericalError as err:
        if debug:
            raise
        _fail(f"numerical problem: {err}", 1)
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written to the output folder", 130)
    except Exception as err:  # unexpected: one line, the traceback only with --debug
        if debug:
            raise
        _fail(f"internal error ({type(err).__name__}): {err}. Re-run with --debug for the traceback", 1)


def _split(args: list[str] | None) -> tuple[str | None, list[str]]:
    from compress.errors import UserError

    recipe, overrides = None, []
    for arg in args or []:
        if arg.startswith("-"):
            raise UserError(f"unknown option {arg}; options are --overwrite, --debug, --quiet")
        if "=" not in arg:
            raise UserError(f"argument '{arg}' is not key=value (e.g. model=smollm2-135m)")
        key, _, value = arg.partition("=")
        if key == "recipe":
            recipe = value
        else:
            overrides.append(arg)
    return recipe, overrides


def _load(args, extra: list[str] = ()):
    from compress.errors import UserError
    from compress.recipe import load_recipe

    recipe, overrides = _split(args)
    if recipe is None:
        raise UserError("no recipe given: add recipe=NAME (see `compress ls`) or recipe=path.yaml")
    return load_recipe(recipe, list(overrides) + list(extra))


@app.command()
def run(args: list[str] = ARGS,
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output folder"),
        quiet: bool = typer.Option(False, "--quiet", help="no progress bars"), debug: bool = DEBUG):
    """Prune a model as the recipe says and write the checkpoint."""

    def action():
        from compress.runner.pipeline import run as run_pipeline

        recipe = _load(args, ["export.overwrite=true"] if overwrite else [])
        start = time.perf_counter()
        report = run_pipeline(recipe, progress=not quiet, log=lambda m: typer.echo(m, err=True))
        _summary(report, time.perf_counter() - start)

    _guard(debug, action)


def _summary(report: dict, total_seconds: float) -> None:
    params = report["params"]
    ppl = report["ppl"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [
        ("parameters", f"{params['total_before']:,} -> {params['total_after']:,}"),
        ("decoder-linear sparsity", f"{report['sparsity']['achieved_decoder_linear']:.2%} removed, "
                                    f"{report['sparsity']['zero_fraction_decoder_linear']:.2%} zeros"),
        (f"ppl ({ppl['windows']})", f"{fmt(ppl.get('dense'))} -> {fmt(ppl.get('pruned'))}"),
        ("pruning time", f"{report['seconds']['prune']:.1f} s"),
        ("total time", f"{total_seconds:.1f} s"),
        ("peak memory", f"{report['peak_rss_mib']:.0f} MiB"),
        ("output", report.get("export", {}).get("output", "(not exported)")),
    ]
    width = max(len(name) for name, _ in rows)
    typer.echo("")
    for name, value in rows:
        typer.echo(f"  {name:<{width}}  {value}")


@app.command()
def validate(args: list[str] = ARGS, debug: bool = DEBUG):
    """Check a recipe (schema, model source, data files, output folder) without loading weights."""

    def action():
        from compress.recipe.preflight import preflight

        recipe = _load(args)
        preflight(recipe, export=recipe.export.output is not None)
        typer.echo("recipe is valid")

    _guard(debug, action)


@app.command(name="print")
def print_recipe(args: list[str] = ARGS, debug: bool = DEBUG):
    """Print the resolved recipe (defaults filled in, overrides applied) as YAML."""

    def action():
        from compress.recipe import dump_recipe

        typer.echo(dump_recipe(_load(args)), nl=False)

    _guard(debug, action)


@app.command(name="ls")
def list_things():
    """List packaged recipes, methods and built-in models."""
    from compress.methods import METHODS
    from compress.model.loading import BUILTINS
    from compress.recipe import RECIPES_DIR, packaged_recipes

    typer.echo("recipes:")
    for name in packaged_recipes():
        first = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        typer.echo(f"  {name:<16} {first}")
    typer.echo("methods:")
    for name, cls in sorted(METHODS.items()):
        summary = (sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0]
        typer.echo(f"  {name:<16} {summary}")
    typer.echo("built-in models:")
    for name, spec in BUILTINS.items():
        typer.echo(f"  {name:<16} {spec.description}")


@app.command()
def cp(name: str, destination: str, debug: bool = DEBUG):
    """Copy a packaged recipe to a file you can edit."""

    def action():
        from compress.errors import UserError
        from compress.recipe import find_recipe

        target = Path(destination)
        if target.exists():
            raise UserError(f"{target} exists; choose another destination")
        shutil.copyfile(find_recipe(name), target)
        typer.echo(f"copied {name} to {target}")

    _guard(debug, action)


@app.command(name="eval")
def evaluate(args: list[str] = ARGS, quiet: bool = typer.Option(False, "--quiet"), debug: bool = DEBUG):
    """Perplexity of a model: `compress eval model=NAME_OR_PATH [ppl=quick|full|N] [text=FILE | name=SET]`.

    The text is the packaged WikiText-2 test split unless `text=FILE` or `name=` (wikitext2-hf, c4) says otherwise.
    """

    def action():
        from pydantic import ValidationError

        from calibration.data import describe_data
        from compress.arch.config_view import ConfigView
        from compress.errors import UserError
        from compress.model.evaluate import evaluate_ppl
        from compress.model.loading import load_model
        from compress.progress import Progress
        from compress.recipe import EvalConfig, ModelConfig, parse_value
        from compress.recipe.preflight import check_eval, check_model

        values = {}
        for arg in args or []:
            if "=" not in arg:
                raise UserError(f"argument '{arg}' is not key=value")
            key, _, value = arg.partition("=")
            values[key] = parse_value(value)
        baseline, gated = values.pop("baseline", None), "max_ratio" in values
        max_ratio = float(values.pop("max_ratio", 1.02))
        if baseline is None and gated:
            raise UserError("max_ratio= needs baseline=REPORT (the report.json to compare with)")
        task_keys = ("tasks", "task_paths", "task_limit", "num_fewshot", "task_batch_size")
        allowed = {"model", "ppl", "text", "name", "seq_len", "dtype", "threads", *task_keys}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise UserError(f"unknown eval key '{unknown[0]}'; valid keys: {', '.join(sorted(allowed))}")
        for key in ("tasks", "task_paths"):  # tasks=arc_easy or tasks=[arc_easy,piqa]
            if isinstance(values.get(key), str):
                values[key] = [values[key]]
        if values.get("ppl") == "none" and not values.get("tasks"):
            raise UserError("compress eval measures perplexity (and tasks=...), so ppl=none alone leaves nothing "
                            "to do; give ppl=quick, ppl=full, a window count or tasks=[...]")
        try:
            model_cfg = ModelConfig(name=values.get("model"), dtype=values.get("dtype", "float32"))
            evaluation = EvalConfig(**{k: values[k] for k in ("ppl", "text", "name", "seq_len", *task_keys)
                                       if k in values})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "text"
            raise UserError(f"eval key '{where}': {first['msg'].removeprefix('Value error, ')}") from None
        if baseline is not None and evaluation.ppl == "none":
            raise UserError("baseline= compares perplexity; give ppl=quick, ppl=full or a window count")
        _, config = check_model(model_cfg)
        check_eval(evaluation, ConfigView(config), file_key="text")
        reference = baseline_ppl(str(baseline), evaluation, describe_data(evaluation)) if baseline else None
        if values.get("threads"):
            import torch

            torch.set_num_threads(int(values["threads"]))
        model, tokenizer = load_model(model_cfg.name, model_cfg.dtype)
        if evaluation.tasks:
            from compress.model.evaluate import scores_line, task_scores

            for task, scores in task_scores(model, tokenizer, evaluation).items():
                typer.echo(f"{task} ({evaluation.num_fewshot}-shot): {scores_line(scores)}")
        if evaluation.ppl == "none":
            return
        value = evaluate_ppl(model, tokenizer, evaluation, Progress(not quiet), "eval")
        typer.echo(f"ppl ({evaluation.ppl}, {evaluation.seq_len} tokens, {describe_data(evaluation)}) {value:.4f}")
        if reference is not None:
            ratio = value / reference
            verdict = f"ppl {value:.4f} vs baseline {reference:.4f}: ratio {ratio:.4f}"
            if not ratio <= max_ratio:
                typer.echo(f"regressed: {verdict} > max_ratio {max_ratio:g}", err=True)
                raise typer.Exit(1)
            typer.echo(f"ok: {verdict} <= max_ratio {max_ratio:g}")

    _guard(debug, action)


def baseline_ppl(path: str, evaluation, text: str) -> float:
    """The pruned perplexity a report.json (or an export folder holding one) recorded, measured the same way."""
    import json

    from compress.errors import UserError

    report_path = Path(path) / "report.json" if Path(path).is_dir() else Path(path)
    if not report_path.is_file():
        raise UserError(f"baseline report not found: {report_path}; give baseline=OUT/report.json")
    ppl = json.loads(report_path.read_text()).get("ppl") or {}
    if ppl.get("pruned") is None:
        raise UserError(f"{report_path} holds no pruned perplexity (its run had eval.ppl=none)")
    measured = {"ppl": str(evaluation.ppl), "seq_len": evaluation.seq_len, "text": text}
    recorded = {"ppl": str(ppl.get("windows")), "seq_len": ppl.get("seq_len"), "text": ppl.get("text")}
    for key, value in recorded.items():
        if value != measured[key]:
            raise UserError(f"the baseline was measured with {key}={value}, this run with {key}={measured[key]}; "
                            f"pass {key}={value} so the two compare")
    return float(ppl["pruned"])


@app.command()
def push(folder: str = typer.Argument(..., help="an export folder written by `compress run`"),
         repo_id: str = typer.Argument(..., help="the Hub repository, e.g. me/smollm2-flap20"),
         public: bool = typer.Option(False, "--public", help="create the repository public (default: private)"),
         revision: str = typer.Option(None, "--revision", "--branch", help="push to this branch (created if missing)"),
         message: str = typer.Option(None, "--message", help="commit message (default: model and stages)"),
         debug: bool = DEBUG):
    """Upload a verified export to the Hugging Face Hub (one commit; the token is never printed)."""

    def action():
        from compress.export.hub import push as push_folder

        push_folder(Path(folder), repo_id, public=public, revision=revision, message=message,
                    log=lambda m: typer.echo(m))

    _guard(debug, action)


@app.command()
def gguf(folder: str = typer.Argument(..., help="an export folder written by `compress run`"),
         output: str = typer.Option(None, "--output", help="the GGUF file (default: FOLDER/model-DTYPE.gguf)"),
         dtype: str = typer.Option("f16", "--dtype", help="f16, bf16 or f32 (quantize with llama-quantize)"),
         pre: str = typer.Option(None, "--pre", help="llama.cpp's pre-tokenizer name, when it cannot be inferred"),
         overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing GGUF file"),
         debug: bool = DEBUG):
    """Write a Llama-family export as GGUF for llama.cpp (`deci` when layer widths differ, else `llama`)."""

    def action():
        from compress.export.gguf import write_gguf

        write_gguf(Path(folder), Path(output) if output else None, dtype=dtype, pre=pre, overwrite=overwrite,
                   log=lambda m: typer.echo(m))

    _guard(debug, action)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
