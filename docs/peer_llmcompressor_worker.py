"""One llm-compressor pruning run, for docs/peer_llmcompressor.py (run with the llm-compressor venv's python).

    $LLMC_VENV/bin/python docs/peer_llmcompressor_worker.py --model FOLDER --windows WINDOWS.safetensors \
        --method sparsegpt --mask 2:4 --output OUT/llmc_sparsegpt_2_4

Loads the model folder in float32 on CPU, prunes it with `oneshot` (SparseGPTModifier or
WandaPruningModifier, every Linear of the decoder, lm_head ignored) on the given calibration windows
(int64 `input_ids` [N, L], as a datasets.Dataset, not shuffled), saves the pruned weights as a plain dense safetensors
folder that stock transformers loads, and writes OUTPUT.json: the pruning seconds (the `oneshot` call
only: data loader, tracing, calibration and pruning), the versions, the zero fraction of the decoder
linears and whether the embeddings / lm_head were left as they were.
Imports nothing from compress: the venv has llm-compressor's own pins (transformers 5.17).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Every nn.Linear inside the decoder layers, by full name (lm_head is not in a decoder layer)."""
    layers = model.model.layers
    return {f"model.layers.{index}.{name}": module for index, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


def zero_fraction(linears: dict[str, torch.nn.Linear]) -> float:
    zeros = sum(int((linear.weight == 0).sum()) for linear in linears.values())
    return zeros / sum(linear.weight.numel() for linear in linears.values())


def check_saved(output: Path, source: Path, prefixes: list[str]) -> dict:
    """What the saved folder holds: tensor dtypes, whether the weights outside the decoder linears
    (embeddings, norms, and lm_head if saved) equal the source model's, and no compression config."""
    saved = {}
    for file in sorted(output.glob("*.safetensors")):
        saved.update(load_file(file))
    original = {}
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                original[key] = handle.get_tensor(key)
    untouched = [key for key in saved if not key.startswith(tuple(prefixes))]
    changed = [key for key in untouched if key in original and not torch.equal(saved[key], original[key])]
    config = json.loads((output / "config.json").read_text())
    return {"tensors": len(saved), "dtypes": sorted({str(t.dtype) for t in saved.values()}),
            "outside_decoder_linears_changed": changed,
            "embed_tokens_unchanged": torch.equal(saved["model.embed_tokens.weight"],
                                                  original["model.embed_tokens.weight"]),
            "lm_head_saved": "lm_head.weight" in saved,
            "config_keys_added": sorted(set(config) - set(json.loads((source / "config.json").read_text()))),
            "quantization_config": "quantization_config" in config}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="float model folder (config.json + safetensors)")
    parser.add_argument("--windows", required=True, help="safetensors file with int64 input_ids [N, L]")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    parser.add_argument("--mask", default="0:0", help="N:M (N zeros in every M inputs) or 0:0 = unstructured")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--block-size", type=int, default=128, help="SparseGPT columns per block")
    parser.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening, x mean(diag H)")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration batch (llm-compressor's default 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, help="folder for the pruned model; OUTPUT.json beside it")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(args.windows)["input_ids"]
    num_samples, seq_len = ids.shape
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist()})
    settings = {"sparsity": args.sparsity, "mask_structure": args.mask, "targets": ["Linear"],
                "ignore": ["re:.*lm_head"]}  # without it the (tied) lm_head, hence the embeddings, are pruned too
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(**settings, block_size=args.block_size, dampening_frac=args.dampening)
    else:
        modifier = WandaPruningModifier(**settings)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, recipe=modifier, dataset=dataset, num_calibration_samples=num_samples,
            max_seq_length=seq_len, shuffle_calibration_samples=False, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    linears = decoder_linears(model)
    output = Path(args.output)
    # save_compressed=False: dense tensors and no compression config, so stock transformers loads the folder
    model.save_pretrained(output, save_compressed=False)
    tokenizer.save_pretrained(output)
    result = {
        "method": args.method, "mask_structure": args.mask, "sparsity": args.sparsity,
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "dampening_frac": args.dampening if args.method == "sparsegpt" else None,
        "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "num_samples": num_samples, "seq_len": seq_len, "seconds": seconds,
        "zero_fraction_decoder_linear": zero_fraction(linears), "decoder_linears": len(linears),
        "modifier": modifier.model_dump(mode="json", exclude_none=True),
        "saved": check_saved(output, Path(args.model), list(linears)),
        "versions": {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers",
                                                      "torch", "datasets")},
        "pid": os.getpid(),
    }
    Path(f"{output}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in ("seconds", "zero_fraction_decoder_linear")}))


if __name__ == "__main__":
    main()
