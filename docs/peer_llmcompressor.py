"""llm-compressor 0.14 side by side with compress: same model, same calibration windows, same perplexity.

    python docs/peer_llmcompressor.py                    # the six default runs, one at a time (see RUNS)
    python docs/peer_llmcompressor.py llmc_wanda_2_4 ours_wanda_2_4      # some runs, by name
    python docs/peer_llmcompressor.py --samples 4 --seq-len 64 --eval-windows 2 llmc_sparsegpt_2_4   # smoke
    python docs/peer_llmcompressor.py --seed 1 llmc_sparsegpt_2_4 ours_sparsegpt_2_4   # other calibration offsets
    python docs/peer_llmcompressor.py --list

Prints one markdown row per run:
| run | quick ppl | dense ppl | zeros in decoder linears | prune seconds | peak RSS MiB | command |
and merges every result (with its protocol) into $PEER_DIR/results.json (default /tmp/compress-peer).

The protocol (the calibration and eval blocks of the packaged wanda_50 recipe, i.e. the defaults):
- model: the built-in smollm2-135m (SmolLM2-135M-Instruct de-quantized from its GGUF to float32, the
  cached safetensors folder of `compress.model.loading.builtin_folder`), float32 on CPU, 2 threads.
- calibration: 128 windows of 512 tokens of the packaged WikiText-2 wiki.valid.tokens at seeded
  offsets (seed 0), drawn by our own `calibration.data.calibration_windows` and written to
  $PEER_DIR/calibration-NxL-seedS.safetensors (int64 `input_ids` [N, L]). llm-compressor gets that
  file as a `datasets.Dataset` with one `input_ids` column (no attention mask: our calibration passes
  none either), `num_calibration_samples=N`, `max_seq_length=L`, `shuffle_calibration_samples=False`.
- evaluation: `compress.model.evaluate.eval_windows` + `perplexity` on the packaged wiki.test.raw,
  non-overlapping 512-token windows, the first 64 (`ppl=quick`). Our rows take it from the run's
  report.json (the run measures with the same functions); llm-compressor's pruned folder is loaded
  with stock transformers in this process and measured here. The dense perplexity of llm-compressor's
  rows is measured here once per protocol (cached in $PEER_DIR/dense_ppl.json).
- zeros: fraction of exact zeros in the linears of the decoder layers (`decoder_zero_fraction`,
  the figure of our report.json), computed here on the reloaded folder for llm-compressor's rows.
- prune seconds: ours = report.json `seconds.prune` (drawing the windows + all stages); theirs = the
  wall time of the `oneshot` call (data loader, model tracing, calibration, pruning). Model loading,
  evaluation and saving are outside both.
- peak RSS: "Maximum resident set size" of `/usr/bin/time -v` over the whole process. Ours includes
  the dense and pruned evaluations and the export with its reload check; the llm-compressor worker
  loads, prunes and saves (no evaluation). report.json's per-phase peaks are kept in results.json.

llm-compressor lives in its own virtualenv, $LLMC_VENV (default /work/venv-llmc), made on first use:

    python3 -m venv /work/venv-llmc
    /work/venv-llmc/bin/pip install torch==2.13.0          # first: the CPU build, from the local wheel
    echo torch==2.13.0 > /work/venv-llmc/constraints.txt
    /work/venv-llmc/bin/pip install "llmcompressor==0.14.*" -c /work/venv-llmc/constraints.txt

llmcompressor 0.14.0.1 asks for torch>=2.10,<=2.14.0, so the torch already there is kept; the
constraints file makes sure of it. It pins transformers<=5.17.0, hence a separate venv. Installed
(2026-12-01): llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0,
torch 2.13.0+cpu, datasets 5.2.0, accelerate 1.15.0 (and auto-round 0.15.1, a dependency).

llm-compressor's settings (docs/peer_llmcompressor_worker.py): SparseGPTModifier or
WandaPruningModifier, sparsity 0.5, mask_structure "2:4" or "0:0" (unstructured), targets
["Linear"], ignore ["re:.*lm_head"] (without it the tied lm_head, i.e. the embeddings, is pruned too),
SparseGPT block_size 128 and dampening_frac 0.01 (both also its defaults), calibration batch 1 (its
default). It runs its sequential pipeline: one decoder layer at a time, all the linears of a layer
calibrated in one pass on that layer's inputs, then pruned, then the pruned layer's outputs are
propagated to the next layer (propagate_error=True). Its sampler (LengthAwareSampler) reorders
equal-length windows (an unstable argsort), so the 128 windows are the same but not accumulated
in file order. The pruned model is saved with `save_pretrained(save_compressed=False)`: dense
float32 tensors, no compression config, embeddings checked unchanged (OUTPUT.json `saved`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import bench  # docs/bench.py, beside this script: its `timed`
import torch

OUT = Path(os.environ.get("PEER_DIR", "/tmp/compress-peer"))
VENV = Path(os.environ.get("LLMC_VENV", "/work/venv-llmc"))
WORKER = Path(__file__).resolve().with_name("peer_llmcompressor_worker.py")
MODEL = "smollm2-135m"
PROTOCOL_RECIPE = "wanda_50"  # whose calibration and eval blocks (the defaults) every run uses
TORCH = "torch==2.13.0"
LLMCOMPRESSOR = "llmcompressor==0.14.*"
THREADS = 2

# llm-compressor: (modifier, mask_structure); ours: `compress run` arguments
LLMC_RUNS = {
    "llmc_sparsegpt_2_4": ("sparsegpt", "2:4"),
    "llmc_sparsegpt_50": ("sparsegpt", "0:0"),
    "llmc_wanda_2_4": ("wanda", "2:4"),
    "llmc_wanda_50": ("wanda", "0:0"),
}
OUR_RUNS = {
    "ours_sparsegpt_2_4": "recipe=sparsegpt_50 pattern=2:4",
    "ours_sparsegpt_50": "recipe=sparsegpt_50",
    "ours_wanda_2_4": "recipe=wanda_50 pattern=2:4",
    "ours_wanda_50": "recipe=wanda_50",
    "ours_sparsegpt_2_4_dense_inputs": "recipe=sparsegpt_50 pattern=2:4 stages.0.inputs=dense",
    "ours_sparsegpt_50_dense_inputs": "recipe=sparsegpt_50 stages.0.inputs=dense",
    "ours_sparsegpt_4_8": "recipe=sparsegpt_50 pattern=4:8",
    "ours_sparsegpt_2_4_stride2": "recipe=sparsegpt_50 pattern=2:4 stages.0.token_stride=2",
    "ours_sparsegpt_2_4_one_pass": "recipe=sparsegpt_50 pattern=2:4 stages.0.within_layer=false",
    "ours_sparsegpt_50_one_pass": "recipe=sparsegpt_50 stages.0.within_layer=false",
    "ours_sparsegpt_2_4_norefit": "recipe=sparsegpt_50 pattern=2:4 stages.0.refit_iterations=0",
    "ours_sparsegpt_50_norefit": "recipe=sparsegpt_50 stages.0.refit_iterations=0",
}
RUNS = [*LLMC_RUNS, *OUR_RUNS]
DEFAULT_RUNS = ["llmc_sparsegpt_2_4", "ours_sparsegpt_2_4", "llmc_sparsegpt_50", "ours_sparsegpt_50",
                "llmc_wanda_2_4", "ours_wanda_2_4"]
HEADER = ("| run | quick ppl | dense ppl | zeros in decoder linears | prune seconds | peak RSS MiB | command |\n"
          "|---|---|---|---|---|---|---|")


def venv_python() -> Path:
    """The llm-compressor venv's python; the venv is created and filled first if it is missing."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return python
    print(f"setting up {VENV} (a minute)", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    pip = [python, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, TORCH], check=True)  # before llmcompressor: an unpinned torch is a CUDA build
    constraints = VENV / "constraints.txt"
    constraints.write_text(f"{TORCH}\n")
    subprocess.run([*pip, LLMCOMPRESSOR, "-c", constraints], check=True)
    return python


def protocol_overrides(args) -> list[str]:
    """`key=value` overrides of the protocol, for both `load_recipe` and `compress run` (none by default)."""
    overrides = []
    if args.samples is not None:
        overrides.append(f"calibration.num_samples={args.samples}")
    if args.seq_len is not None:
        overrides.append(f"calibration.seq_len={args.seq_len}")
    if args.eval_windows is not None:
        overrides.append(f"ppl={args.eval_windows}")
    if args.seed is not None:
        overrides.append(f"calibration.seed={args.seed}")
    return overrides


class Protocol:
    """Calibration windows, evaluation windows and dense perplexity, all from compress's own code."""

    def __init__(self, overrides: list[str]):
        from transformers import AutoTokenizer

        from compress.model.loading import builtin_folder
        from compress.recipe import load_recipe

        self.overrides = overrides
        self.recipe = load_recipe(PROTOCOL_RECIPE, overrides)
        self.folder = builtin_folder(MODEL)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self._test_windows = None

    def describe(self) -> dict:
        cal, evaluation = self.recipe.calibration, self.recipe.eval
        return {"model": MODEL, "folder": str(self.folder), "overrides": self.overrides,
                "calibration": cal.model_dump(mode="json"), "eval": evaluation.model_dump(mode="json")}

    def check_recipe(self, recipe) -> None:
        """A run of ours must calibrate and evaluate exactly as the protocol says."""
        if recipe.calibration != self.recipe.calibration or recipe.eval != self.recipe.eval:
            raise SystemExit(f"recipe '{recipe.description}' calibrates or evaluates unlike {PROTOCOL_RECIPE}; "
                             f"this comparison needs the same blocks")

    def calibration_file(self) -> Path:
        from safetensors.torch import save_file

        from calibration.data import calibration_windows

        cal = self.recipe.calibration
        path = OUT / f"calibration-{cal.num_samples}x{cal.seq_len}-seed{cal.seed}.safetensors"
        if not path.exists():
            windows = calibration_windows(cal, None, self.tokenizer)
            save_file({"input_ids": windows.to(torch.int64).contiguous()}, path)
        return path

    def test_windows(self) -> torch.Tensor:
        from calibration.data import read_source_text, tokenize_text
        from compress.model.evaluate import eval_windows

        if self._test_windows is None:
            evaluation = self.recipe.eval
            ids = tokenize_text(self.tokenizer, read_source_text(evaluation, "eval", "eval"))
            self._test_windows = eval_windows(ids, evaluation.seq_len, evaluation.ppl)
        return self._test_windows

    def measure(self, folder: Path, kept_in: tuple[int, int] | None = None) -> tuple[float, float]:
        """(perplexity, zero fraction of the decoder linears) of a plain safetensors model folder;
        `kept_in` = (N, M): check that every decoder linear keeps at most N weights in every M inputs."""
        from transformers import AutoModelForCausalLM

        from compress.arch import get_adapter
        from compress.model.evaluate import perplexity
        from compress.ops.masks import follows_nm
        from compress.runner.report import decoder_zero_fraction

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
        try:
            adapter = get_adapter(model)
            if kept_in is not None:
                broken = [f"layer {index} {name}" for index, layer in enumerate(adapter.layers())
                          for name, linear in adapter.decoder_linears(layer).items()
                          if not follows_nm(linear.weight, *kept_in)]
                if broken:
                    raise SystemExit(f"{folder}: not {kept_in[0]}:{kept_in[1]}: {broken[:5]}")
            return perplexity(model, self.test_windows()), decoder_zero_fraction(adapter)
        finally:
            del model
            gc.collect()

    def dense_ppl(self) -> float:
        cache = OUT / "dense_ppl.json"
        known = json.loads(cache.read_text()) if cache.exists() else {}
        key = f"{MODEL} eval={json.dumps(self.describe()['eval'], sort_keys=True)}"
        if key not in known:
            known[key] = self.measure(self.folder)[0]
            cache.write_text(json.dumps(known, indent=2) + "\n")
        return known[key]


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """`bench.timed`, with the output in `log`: (wall seconds, peak RSS MiB)."""
    result, seconds, rss_mib = bench.timed(command)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{shlex.join(map(str, command))} failed (log {log}):\n{result.stderr[-3000:]}")
    return seconds, rss_mib


def shown(command: list) -> str:
    """The command as printed in the table, with the venv and output folder as $LLMC_VENV / $PEER_DIR."""
    text = shlex.join(map(str, command)).replace(str(OUT), "$PEER_DIR").replace(str(VENV), "$LLMC_VENV")
    return text.replace(str(WORKER), f"docs/{WORKER.name}")


def run_llmc(name: str, protocol: Protocol, python: Path, batch_size: int) -> dict:
    method, mask = LLMC_RUNS[name]
    output = OUT / name
    shutil.rmtree(output, ignore_errors=True)
    Path(f"{output}.json").unlink(missing_ok=True)
    command = [python, WORKER, "--model", protocol.folder, "--windows", protocol.calibration_file(),
               "--method", method, "--mask", mask, "--batch-size", batch_size, "--threads", THREADS,
               "--output", output]
    wall, rss = timed(command, OUT / f"{name}.log")
    worker = json.loads(Path(f"{output}.json").read_text())
    saved = worker["saved"]
    if saved["outside_decoder_linears_changed"] or not saved["embed_tokens_unchanged"] or saved["quantization_config"]:
        raise SystemExit(f"{name}: llm-compressor changed weights outside the decoder linears or saved a "
                         f"compressed config: {saved}")
    zeros_in, group = map(int, mask.split(":"))  # llm-compressor's N:M counts zeros, ours kept weights
    ppl, zeros = protocol.measure(output, (group - zeros_in, group) if group else None)
    if abs(zeros - worker["zero_fraction_decoder_linear"]) > 1e-9:
        raise SystemExit(f"{name}: the saved folder has {zeros:.4%} zeros, the pruned model had "
                         f"{worker['zero_fraction_decoder_linear']:.4%}")
    return {"run": name, "ppl": ppl, "dense_ppl": protocol.dense_ppl(), "zeros": zeros,
            "prune_seconds": worker["seconds"], "peak_rss_mib": rss, "wall_seconds": wall,
            "command": shown(command), "worker": worker}


def run_ours(name: str, protocol: Protocol) -> dict:
    from compress.recipe import load_recipe

    arguments = shlex.split(OUR_RUNS[name])
    recipe_name = arguments[0].removeprefix("recipe=")
    protocol.check_recipe(load_recipe(recipe_name, [*arguments[1:], *protocol.overrides]))
    output = OUT / name
    command = ["compress", "run", *arguments, *protocol.overrides, f"model={MODEL}", f"threads={THREADS}",
               "--quiet", "--overwrite", f"output={output}"]
    wall, rss = timed(command, OUT / f"{name}.log")
    report = json.loads((output / "report.json").read_text())
    return {"run": name, "ppl": report["ppl"]["pruned"], "dense_ppl": report["ppl"]["dense"],
            "zeros": report["sparsity"]["zero_fraction_decoder_linear"], "prune_seconds": report["seconds"]["prune"],
            "peak_rss_mib": rss, "wall_seconds": wall,
            "command": shown(command),
            "report": {key: report[key] for key in ("seconds", "peak_rss_mib_by_phase", "sparsity", "versions")}}


def row(result: dict) -> str:
    return (f"| {result['run']} | {result['ppl']:.2f} | {result['dense_ppl']:.2f} | {result['zeros']:.2%} | "
            f"{result['prune_seconds']:.0f} | {result['peak_rss_mib']:,.0f} | `{result['command']}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs", nargs="*", metavar="RUN", help=f"runs to do, in order (default: {DEFAULT_RUNS})")
    parser.add_argument("--samples", type=int, help="calibration windows (default 128)")
    parser.add_argument("--seq-len", type=int, help="tokens per calibration window (default 512)")
    parser.add_argument("--eval-windows", type=int, help="evaluation windows of 512 tokens (default: quick = 64)")
    parser.add_argument("--seed", type=int, help="seed of the calibration offsets, for both tools (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="llm-compressor's calibration batch (default 1)")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    args = parser.parse_args()
    if args.list:
        for name in RUNS:
            print(name, LLMC_RUNS.get(name) or OUR_RUNS[name], "(default)" if name in DEFAULT_RUNS else "")
        return
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {RUNS}")

    torch.set_num_threads(THREADS)
    from transformers.utils import logging

    logging.disable_progress_bar()
    OUT.mkdir(parents=True, exist_ok=True)
    protocol = Protocol(protocol_overrides(args))
    results_file = OUT / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = args.runs or DEFAULT_RUNS
    python = venv_python() if any(name in LLMC_RUNS for name in runs) else None
    print(HEADER, flush=True)
    for name in runs:
        result = run_llmc(name, protocol, python, args.batch_size) if name in LLMC_RUNS else run_ours(name, protocol)
        key = name if args.seed is None else f"{name}_seed{args.seed}"
        results[key] = {**result, "protocol": protocol.describe(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        print(row(result), flush=True)
    print(f"results: {results_file}", file=sys.stderr)


if __name__ == "__main__":
    main()
