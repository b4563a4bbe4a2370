"""The model card (README.md) of an export: what was pruned, the measured rows, how to load it."""

from __future__ import annotations

from pathlib import Path

from compress.methods import METHODS
from compress.recipe import Recipe


def model_card(recipe: Recipe, report: dict) -> str:
    ppl = report["ppl"]
    params = report["params"]
    stages = ", ".join(s.summary() if METHODS[s.method].prunes else f"{s.method} recovery" for s in recipe.stages)
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
