"""How time and memory grow with the model: one command that measures, fits and plots (issue: scaling).

    python docs/scaling.py                  # build the models, run every missing case, print the tables, plot
    python docs/scaling.py run CASE ...     # only these cases (names as printed by `list`)
    python docs/scaling.py list             # the cases and whether they have a result
    python docs/scaling.py report           # tables, fits and plots from the results so far
    python docs/scaling.py solves           # the d^3 parts alone: Cholesky / least squares / SparseGPT vs width

Models: random-weight Llama-architecture checkpoints built from configs (bfloat16, seed 0, the
SmolLM2 tokenizer and vocabulary) at the shapes of SmolLM2-135M, SmolLM2-360M, SmolLM2-1.7B and
Llama-3.2-3B, plus the real SmolLM2-135M (float32, the benchmark's model). Random weights change
nothing about cost: every method does the same work whatever the values (only quality is
meaningless, so no perplexity is measured here).

Each case is one `compress run` (or, for the floor, one plain forward over the same tokens) under
`/usr/bin/time -v`, one at a time, the page cache dropped before it where the machine allows, so
the bytes read are bytes read from disk. Results accumulate in docs/scaling_results.jsonl (kept in
the repository, so `report` redraws the tables and plots from every run so far; $SCALING_RESULTS
points elsewhere), one line per case, with the commit and date that measured it; a case already
measured at the current commit is not run again. Models and run folders go to $BENCH_DIR/scaling
(default /tmp/compress-bench/scaling).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "docs"))
from bench import timed as bench_timed  # noqa: E402

from compress.ops.training import LOSS_CHUNK  # noqa: E402

OUT = Path(os.environ.get("BENCH_DIR", "/tmp/compress-bench")) / "scaling"
RESULTS = Path(os.environ.get("SCALING_RESULTS", ROOT / "docs" / "scaling_results.jsonl"))
SEQ_LEN = 512
BATCH = 4  # calibration batch size of every recipe used here (and of the floor)
VOCAB = 49152

# name: (hidden, MLP width, layers, attention heads, KV heads) -- the shapes of released models
SHAPES = {
    "llama-135m": (576, 1536, 30, 9, 3),  # SmolLM2-135M
    "llama-360m": (960, 2560, 32, 15, 5),  # SmolLM2-360M
    "llama-1.7b": (2048, 8192, 24, 32, 32),  # SmolLM2-1.7B
    "llama-3b": (3072, 8192, 28, 24, 8),  # Llama-3.2-3B (with SmolLM2's 49,152-token vocabulary)
}
REAL = "smollm2-135m"

LORA_RECIPE = "flap_50_lora"
# method: the `compress run` arguments ({n}: calibration windows; lora: {steps} of 8 x 512 tokens)
METHODS = {
    "flap": "recipe=flap_20",
    "wanda": "recipe=wanda_50",
    "sparsegpt": "recipe=sparsegpt_50",
    "lora": ("recipe=" + LORA_RECIPE + " calibration.num_samples=8 stages.1.steps={steps} stages.1.batch_size=8 "
             "stages.1.seq_len=512 stages.1.warmup_steps=0"),
}
COMMON = "--quiet --overwrite eval.ppl=none eval.dense=false calibration.seq_len=512"


def cases() -> dict[str, dict]:
    """Every measured case: model, method (or floor / offload), calibration windows of 512 tokens.

    All four methods and the floor at 32 windows on every shape but the 3B (floor and FLAP there: each
    3B run is 10-25 minutes on 2 cores); 128 windows on the two smallest shapes and the real model (the
    token exponent); LoRA's 4 and 16 steps of 8 x 512 training tokens on the three smaller shapes;
    FLAP with three quarters of the layers on disk for the 1.7B.
    """
    table = {}

    def add(model: str, method: str, n: int) -> None:
        table[f"{model}:{method}:{n}"] = {"model": model, "method": method, "n": n}

    for model in ("llama-135m", "llama-360m", "llama-1.7b", REAL):
        for method in ("floor", "flap", "wanda", "sparsegpt", "lora"):
            add(model, method, 32)
    add("llama-3b", "floor", 32)
    add("llama-3b", "flap", 32)
    add("llama-1.7b", "flap-offload", 32)
    for model in ("llama-135m", "llama-360m", REAL):
        for method in ("floor", "flap", "wanda", "sparsegpt", "lora"):
            add(model, method, 128)
    return table


def commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


# --- the models ------------------------------------------------------------------------------------------


def model_folder(name: str) -> Path:
    if name == REAL:
        from compress.model.loading import builtin_folder

        return builtin_folder(REAL)
    folder = OUT / "models" / name
    if not (folder / "config.json").is_file():
        build(name, folder)
    return folder


def build(name: str, folder: Path) -> None:
    """A random-weight Llama checkpoint of shape SHAPES[name], bfloat16, seed 0, SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compress.model.loading import builtin_folder

    hidden, width, layers, heads, kv_heads = SHAPES[name]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=width, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    print(f"building {name} ({hidden} x {width} x {layers} layers) in {folder}", flush=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bfloat16: no float32 copy of a 3B model
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(builtin_folder(REAL)).save_pretrained(staging)
    staging.rename(folder)


def shape_of(name: str) -> dict:
    """Parameter counts (the report's own count, tied embeddings once) and widths, from a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.runner.report import model_params

    config = AutoConfig.from_pretrained(model_folder(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {"hidden": config.hidden_size, "width": config.intermediate_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "layer_params": model_params(model.model.layers[0]), "params": model_params(model),
            "vocab": config.vocab_size}


# --- running one case --------------------------------------------------------------------------------------


def drop_page_cache() -> bool:
    """Empty the page cache (root on Linux) so the next run's reads come from disk; False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def timed(command: list[str]) -> dict:
    """docs/bench.py's run under `/usr/bin/time -v`, plus the bytes read from / written to the block device."""
    result, seconds, rss_mib = bench_timed(command)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{result.stderr[-3000:]}")

    def blocks(label: str) -> int:
        return int(re.search(rf"File system {label}: (\d+)", result.stderr).group(1))

    return {"wall_s": seconds, "peak_rss_mib": rss_mib, "read_mib": blocks("inputs") * 512 / 2**20,
            "written_mib": blocks("outputs") * 512 / 2**20, "stdout": result.stdout}


def run_case(name: str, spec: dict) -> dict:
    model, method, n = spec["model"], spec["method"], spec["n"]
    folder = model_folder(model)
    dtype = "float32" if model == REAL else "bfloat16"
    cold = drop_page_cache()
    if method == "floor":
        measured = timed([sys.executable, __file__, "_floor", str(folder), dtype, str(n)])
        measured["seconds"] = json.loads(measured.pop("stdout").strip().splitlines()[-1])
    else:
        out = OUT / "runs" / name.replace(":", "_")
        recipe = METHODS["flap" if method == "flap-offload" else method].format(steps=max(n // 8, 1))
        command = f"compress run {recipe} model={folder} model.dtype={dtype} calibration.num_samples={n} {COMMON}"
        if method == "lora":  # calibration stays at 8 windows for the FLAP before it; n sets the training tokens
            command = command.replace(f"calibration.num_samples={n}", "calibration.num_samples=8")
        if method == "flap-offload":  # keep about a quarter of the decoder layers in memory, the rest on disk
            shape = shape_of(model)
            keep = (shape["vocab"] * shape["hidden"] + shape["layers"] // 4 * shape["layer_params"]) * 2
            command += f" 'model.max_memory={{cpu: {keep // 2**20}MiB}}' model.offload_folder={OUT / 'offload'}"
        command += f" output={out}"
        measured = timed(shlex.split(command))
        measured.pop("stdout")
        report = json.loads((out / "report.json").read_text())
        measured["seconds"] = report["seconds"]
        measured["peak_by_phase_mib"] = report["peak_rss_mib_by_phase"]
        measured["command"] = command
        recovery = next((stage for stage in report["stages"] if "train_seconds" in stage), None)
        if recovery is not None:
            measured["train_s"] = recovery["train_seconds"]
        shutil.rmtree(out, ignore_errors=True)  # 6 GB per 3B checkpoint: keep only the figures
    return {"case": name, **spec, "dtype": dtype, "tokens": n * SEQ_LEN, "cold_cache": cold, "commit": commit(),
            "date": time.strftime("%Y-%m-%d"), **shape_of(model), **measured}


def floor(folder: str, dtype: str, n: int) -> None:
    """One plain forward of the model over n x 512 tokens in batches of 4: no hooks, no statistics."""
    import torch

    from compress.model.loading import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    model, _ = load_model(folder, dtype=dtype)
    loaded = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=generator)
    with torch.inference_mode():
        for i in range(0, n, BATCH):
            model(input_ids=ids[i:i + BATCH], use_cache=False, logits_to_keep=1)
    print(json.dumps({"load": loaded - start, "forward": time.perf_counter() - loaded}))


def results() -> dict[str, dict]:
    if not RESULTS.is_file():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {row["case"]: row for row in rows}  # the latest line of a case wins


def run(names: list[str]) -> None:
    table = cases()
    OUT.mkdir(parents=True, exist_ok=True)
    done = results()
    here = commit()
    for name in names:
        if name not in table:
            raise SystemExit(f"unknown case {name}; `python docs/scaling.py list` shows them")
        if done.get(name, {}).get("commit") == here:
            continue
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        row = run_case(name, table[name])
        with RESULTS.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"  {row['wall_s']:.0f} s, peak {row['peak_rss_mib']:,.0f} MiB", flush=True)


# --- the d^3 parts alone ---------------------------------------------------------------------------------


def solves(widths=(576, 1024, 1536, 2048, 3072, 4096, 6144, 8192)) -> list[dict]:
    """Time the width-cubed steps on a down_proj-shaped problem (rows = width / 3.5, Llama-3's ratio):
    the inverse Cholesky of a Hessian, FLAP's least-squares refit keeping 80% of the inputs, and
    SparseGPT's column sweep at 50%; plus the float32 Gram update of 2,048 tokens (the statistics)."""
    import torch

    from compress.ops.obs import inverse_cholesky, prune_columns, remove_inputs

    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for d in widths:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2048, d, generator=generator)
        hessian = (x.T @ x).double() / 2048 + torch.eye(d, dtype=torch.float64)
        weight = torch.randn(max(int(d / 3.5), 1), d, generator=generator)
        kept = torch.randperm(d, generator=generator)[: int(0.8 * d)].sort().values
        timing = {"width": d, "rows": weight.shape[0]}
        start = time.perf_counter()
        x.T @ x
        timing["gram_2048_tokens_s"] = time.perf_counter() - start
        for label, step in (("inverse_cholesky_s", lambda: inverse_cholesky(hessian)),
                            ("least_squares_s", lambda: remove_inputs(weight, hessian, kept)),
                            ("sparsegpt_s", lambda: prune_columns(weight, hessian, 0.5))):
            start = time.perf_counter()
            step()
            timing[label] = time.perf_counter() - start
        print(json.dumps(timing), flush=True)
        rows.append(timing)
    (OUT / "solves.json").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "solves.json").write_text(json.dumps({"commit": commit(), "rows": rows}, indent=1))
    return rows


# --- fits, tables, plots ---------------------------------------------------------------------------------


def fit_power(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """y = c x^k by least squares in log space: (c, k)."""
    import numpy

    k, log_c = numpy.polyfit(numpy.log(xs), numpy.log(ys), 1)
    return float(numpy.exp(log_c)), float(k)


def method_seconds(row: dict) -> float:
    """The method's own time: the stage (lora: the training alone; floor: the forward)."""
    seconds = row["seconds"]
    if row["method"] == "floor":
        return seconds["forward"]
    if row["method"] == "lora":
        return row["train_s"]
    return sum(value for key, value in seconds.items() if key.startswith("stage"))


def lora_entries(row: dict) -> int:
    """Adapter entries of one decoder layer: the LoRA stage's rank and target modules, read from the
    recipe the cases run, times (in + out) of each target at the dense widths (the FLAP 50% before it
    only narrows them, so this bounds the pruned model's count)."""
    from compress import load_recipe

    stage = next(s for s in load_recipe(LORA_RECIPE).stages if s.method == "lora")
    h, f, heads = row["hidden"], row["width"], row["heads"]
    kv = row.get("kv_heads", heads) * (h // heads)
    sizes = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h,
             "gate_proj": h + f, "up_proj": h + f, "down_proj": f + h}
    return stage.rank * sum(sizes[name] for name in stage.target_modules)


def working_set_mib(row: dict) -> dict:
    """The memory bound the design promises: resident weights + the largest layer's working set + 1 GiB.

    Working set, all terms counted generously: the layer's weights once more in float32 (a method's
    working copy); two copies of the calibration hidden states (inputs and outputs of the layer) in the
    model's dtype; one batch's float32 intermediates (q/k/v/o and 3 MLP activations per token) and
    attention scores; the statistics the method keeps while the layer runs (float64 sums plus a float32
    pending product: 12 bytes per entry): FLAP the covariances of o_proj's and down_proj's inputs,
    SparseGPT the Hessians of the layer's four distinct inputs plus two float64 copies of the widest for
    its inverse; Wanda only per-channel norms. LoRA: the checkpointed hidden states of every layer, one
    layer's recomputed float32 activations, the loss over the vocabulary for one chunk of
    `LOSS_CHUNK` positions (logits in the model's dtype and three float32 copies: the upcast, the
    log-softmax and its gradient; compress.ops.training), the adapters with Adam's two moments.
    """
    h, f, layers, heads = row["hidden"], row["width"], row["layers"], row["heads"]
    width = 2 if row["dtype"] == "bfloat16" else 4
    resident = row["params"] * width
    if row["method"] == "flap-offload":  # a quarter of the layers in memory (the max_memory given)
        resident = (row["vocab"] * h + layers // 4 * row["layer_params"]) * width
    tokens = row["tokens"]
    terms = {"layer_weights_fp32": row["layer_params"] * 4}
    if row["method"] == "lora":
        batch = 8 * SEQ_LEN
        terms["checkpoints"] = layers * batch * h * width
        terms["layer_activations_fp32"] = batch * (6 * h + 3 * f) * 4 + 8 * heads * SEQ_LEN**2 * 4
        terms["loss_over_vocabulary"] = LOSS_CHUNK * row["vocab"] * (width + 3 * 4) + batch * h * 4
        terms["adapters_adam"] = layers * lora_entries(row) * 4 * 3  # float32 A and B + Adam's 2 moments
    else:
        terms["hidden_states"] = 2 * (8 * SEQ_LEN if row["method"] == "floor" else tokens) * h * width
        terms["batch_intermediates_fp32"] = BATCH * SEQ_LEN * (4 * h + 3 * f) * 4 + BATCH * heads * SEQ_LEN**2 * 4
        if row["method"] in ("flap", "flap-offload"):
            terms["statistics"] = 12 * (h * h + f * f)
        elif row["method"] == "sparsegpt":
            terms["statistics"] = 12 * (3 * h * h + f * f) + 2 * 8 * f * f
    if row["method"] == "floor":
        terms = {"batch_intermediates_fp32": terms["batch_intermediates_fp32"]}
    working = sum(terms.values())
    return {"resident_mib": resident / 2**20, "working_set_mib": working / 2**20,
            "bound_mib": (resident + working) / 2**20 + 1024, "terms_mib": {k: v / 2**20 for k, v in terms.items()}}


def report() -> None:
    rows = results()
    if not rows:
        raise SystemExit(f"no results yet in {RESULTS}")
    print("| model | params | dtype | method | calibration tokens | method s | floor s | whole run s | peak RSS MiB "
          "(phase) | bound MiB | read / written MiB | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in cases():
        row = rows.get(name)
        if row is None:
            continue
        bound = working_set_mib(row)
        base = rows.get(f"{row['model']}:floor:{row['n']}")
        floor_s = f"{base['seconds']['forward']:.0f}" if base else "–"
        tokens = f"{row['tokens']:,}" + (" (training)" if row["method"] == "lora" else "")
        mark = "" if row["peak_rss_mib"] <= bound["bound_mib"] else " ⚠"
        phases = row.get("peak_by_phase_mib") or {}
        top = max(phases.values(), default=None)
        mark += f" ({next(k for k, v in phases.items() if v == top)})" if phases else ""
        print(f"| {row['model']} | {row['params'] / 1e9:.2f} B | {row['dtype']} | {row['method']} | {tokens} | "
              f"{method_seconds(row):,.0f} | {floor_s} | {row['wall_s']:,.0f} | {row['peak_rss_mib']:,.0f}{mark} | "
              f"{bound['bound_mib']:,.0f} | {row['read_mib']:,.0f} / {row['written_mib']:,.0f} | {row['commit']} |")
    print()
    fits = {}
    for method in ("floor", "flap", "wanda", "sparsegpt", "lora"):
        points = [r for r in rows.values() if r["method"] == method and r["model"] in SHAPES]
        if len({(r["params"], r["tokens"]) for r in points}) < 3:
            continue
        c, k = fit_power([r["params"] * r["tokens"] for r in points], [method_seconds(r) for r in points])
        fits[method] = (c, k)
        print(f"{method}: seconds = {c:.3g} x (params x tokens)^{k:.3f}  ({len(points)} runs)")
        for target, params in (("Llama-3-8B", 8.03e9), ("Llama-3-70B", 70.6e9)):
            print(f"  {target}, 128 x 512 tokens, this CPU (extrapolated): {c * (params * 65536) ** k / 3600:,.1f} h")
    plot(rows, fits)


def plot(rows: dict[str, dict], fits: dict) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for method, marker in (("floor", "o"), ("flap", "s"), ("wanda", "^"), ("sparsegpt", "D"), ("lora", "v")):
        points = sorted((r for r in rows.values() if r["method"] == method), key=lambda r: r["params"] * r["tokens"])
        if not points:
            continue
        xs = [r["params"] * r["tokens"] for r in points]
        axes[0].scatter(xs, [method_seconds(r) for r in points], marker=marker, label=method)
        if method in fits:
            c, k = fits[method]
            grid = [min(xs) * (max(xs) / min(xs)) ** (i / 20) for i in range(21)]
            axes[0].plot(grid, [c * x**k for x in grid], linewidth=0.8)
        axes[1].scatter([working_set_mib(r)["bound_mib"] for r in points], [r["peak_rss_mib"] for r in points],
                        marker=marker, label=method)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("parameters x calibration tokens (LoRA: training tokens)")
    axes[0].set_ylabel("seconds (method stage; floor: plain forward)")
    axes[0].set_title("time")
    axes[0].legend(fontsize="small")
    top = max(max(r["peak_rss_mib"], working_set_mib(r)["bound_mib"]) for r in rows.values())
    axes[1].plot([0, top], [0, top], color="grey", linewidth=0.8, label="peak = bound")
    axes[1].set_xlabel("bound: resident weights + largest layer's working set + 1 GiB (MiB)")
    axes[1].set_ylabel("measured peak RSS (MiB)")
    axes[1].set_title("memory")
    axes[1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(ROOT / "docs" / "scaling.png", metadata={"Software": None})
    plt.close(figure)
    print("plot: docs/scaling.png")


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["_floor"]:
        floor(arguments[1], arguments[2], int(arguments[3]))
    elif arguments[:1] == ["list"]:
        done = results()
        for case in cases():
            print(case, "measured at " + done[case]["commit"] if case in done else "-")
    elif arguments[:1] == ["report"]:
        report()
    elif arguments[:1] == ["solves"]:
        solves()
    elif arguments[:1] == ["run"]:
        run(arguments[1:])
        report()
    elif not arguments:
        run(list(cases()))
        report()
    else:
        raise SystemExit(__doc__)
