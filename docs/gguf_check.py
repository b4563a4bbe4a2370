"""llama.cpp runs our GGUF exports: its perplexity next to ours on the same token windows.

    python docs/gguf_check.py                       # FLAP 20% SmolLM2, per-layer and uniform, f32 and f16
    python docs/gguf_check.py --windows 4 out/my_export       # any Llama-family compress export

For each export (the two defaults, gguf_flap_20 and gguf_flap_20_uniform, are made on first use under
$BENCH_DIR, default /tmp/compress-bench, by `compress run recipe=flap_20 model=smollm2-135m` and the same
with `stages.0.uniform=true`):
1. `compress gguf` writes the GGUF (f32 and f16) to $BENCH_DIR/gguf/;
2. our perplexity: `compress.load(folder)` and `compress.model.evaluate.perplexity` on the first
   `--windows` 512-token windows of the packaged wiki.test.raw (the `quick` protocol is 64);
3. llama.cpp's: `llama_cpp.Llama` (llama-cpp-python, which builds llama.cpp on install) evaluates each
   window's token ids (no tokenizer in between) with all logits kept; NLL from its logits (the f32 file
   with a float32 KV cache, the f16 file with llama.cpp's default float16 one);
4. the tokenizer: llama.cpp's tokenization of the first 20,000 characters of the test text against
   transformers' (same ids or not).
Prints one markdown row per export and precision:
| export | GGUF | MiB | windows | ours ppl | llama.cpp ppl | ratio | max abs logit diff (window 1) | same token ids |

llama-cpp-python: `pip install llama-cpp-python` compiles llama.cpp (about 25 minutes on 2 cores);
`pip wheel llama-cpp-python -w WHEELS` once, then `pip install WHEELS/llama_cpp_python-*.whl`, reuses it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/tmp/compress-bench"))
DEFAULTS = {"gguf_flap_20": ["recipe=flap_20"], "gguf_flap_20_uniform": ["recipe=flap_20", "stages.0.uniform=true"]}


def _ensure(name: str) -> Path:
    import compress

    folder = BENCH_DIR / name
    if not (folder / "report.json").is_file():
        args = DEFAULTS[name][1:] + ["model=smollm2-135m", f"output={folder}", "eval.ppl=none"]
        compress.run(DEFAULTS[name][0].split("=", 1)[1], args, progress=True)
    return folder


def _llama_nll(llm, window: list[int]) -> tuple[float, np.ndarray]:
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)
    shifted = logits[:-1] - logits[:-1].max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(window) - 1), window[1:]].mean()), logits


def check(folder: Path, windows_count: int) -> list[str]:
    from llama_cpp import Llama

    import compress
    from calibration.data import read_source_text, tokenize_text
    from compress.export.gguf import write_gguf
    from compress.model.evaluate import eval_windows, perplexity
    from compress.recipe.schema import EvalConfig

    model = compress.load(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)  # no prompt: it needs no code
    text = read_source_text(EvalConfig(), "eval", "eval")
    windows = eval_windows(tokenize_text(tokenizer, text), 512, windows_count)
    ours = perplexity(model, windows)
    with torch.no_grad():
        first = model(windows[:1]).logits[0].double().numpy()
    rows = []
    for dtype in ("f32", "f16"):
        target = BENCH_DIR / "gguf" / f"{folder.name}-{dtype}.gguf"  # beside, never inside, the export
        target.parent.mkdir(parents=True, exist_ok=True)
        path = write_gguf(folder, target, dtype=dtype, overwrite=True)["path"]
        cache = {"type_k": 0, "type_v": 0} if dtype == "f32" else {}  # GGML_TYPE_F32 KV cache for the f32 file
        llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=2,
                    verbose=False, **cache)
        nlls, difference = [], None
        for index, window in enumerate(windows.tolist()):
            nll, logits = _llama_nll(llm, window)
            nlls.append(nll)
            if index == 0:
                difference = float(np.abs(logits - first).max())
        theirs = math.exp(sum(nlls) / len(nlls))
        sample = text[:20000]
        same = (llm.tokenize(sample.encode(), add_bos=False, special=False)
                == tokenizer(sample, add_special_tokens=False)["input_ids"])
        size = Path(path).stat().st_size / 2**20
        arch = llm.metadata.get("general.architecture")
        rows.append(f"| {folder.name} | {arch} {dtype} | {size:.0f} | {len(windows)} | {ours:.3f} | {theirs:.3f} | "
                    f"{theirs / ours:.4f} | {difference:.2e} | {'yes' if same else 'no'} |")
        print(rows[-1], flush=True)
        del llm
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="*", help="compress exports (default: the two FLAP 20%% SmolLM2 exports)")
    parser.add_argument("--windows", type=int, default=64, help="512-token windows of wiki.test.raw (default 64)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folders = [Path(f) for f in args.folders] or [_ensure(name) for name in DEFAULTS]
    print("| export | GGUF | MiB | windows | ours ppl | llama.cpp ppl | ratio | max abs logit diff (window 1) | "
          "same token ids |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for folder in folders:
        check(folder, args.windows)


if __name__ == "__main__":
    main()
