"""The model card (README.md) of an export: the Hub's metadata header, what was pruned, the measured rows,
the per-layer plot and how to load it. `compress push` fills in the repository id for `PATH`."""

from __future__ import annotations

import re
from pathlib import Path

from compress.export.plots import layer_bars_png
from compress.methods import METHODS
from compress.recipe import Recipe, dump_recipe

PATH = "PATH"  # the folder or Hub id in the loading lines; `compress push` replaces it with the repository id


def base_model_facts(name: str) -> dict:
    """Hub id and license of the base model, where they can be known offline."""
    from compress.model.loading import BUILTINS

    if name in BUILTINS:
        return {"base_model": BUILTINS[name].hub_id, "license": BUILTINS[name].license}
    folder = Path(str(name)).expanduser()
    if folder.is_dir():  # a local folder: its own card's license, if it has one
        card = folder / "README.md"
        found = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.M) if card.is_file() else None
        return {"license": found.group(1)} if found else {}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name)):
        return {"base_model": str(name)}
    return {}


def layers_png(report: dict) -> bytes:
    """Bars per decoder layer: the share of its attention and MLP weights removed (and of zeros left)."""
    layers = report["layers"]
    series = {"attention removed": [row["attention_removed"] for row in layers],
              "MLP removed": [row["mlp_removed"] for row in layers]}
    if any(row["zero_fraction"] > 0.01 for row in layers):
        series["zeros in what is left"] = [row["zero_fraction"] for row in layers]
    return layer_bars_png(series, f"{report['sparsity']['achieved_decoder_linear']:.1%} of the decoder linears "
                                  f"removed: per layer", ylabel="share of the layer's weights")


def _front_matter(recipe: Recipe, facts: dict) -> list[str]:
    methods = sorted({stage.method for stage in recipe.stages})
    lines = ["---"]
    if "base_model" in facts:
        lines.append(f"base_model: {facts['base_model']}")
    if "license" in facts:
        lines.append(f"license: {facts['license']}")
    lines += ["library_name: transformers", "pipeline_tag: text-generation",
              f"tags: [{', '.join(['pruned', 'compress', *methods])}]", "---"]
    return lines


def model_card(recipe: Recipe, report: dict, artifacts: dict | None = None) -> str:
    ppl, params, speed = report["ppl"], report["params"], report.get("speed") or {}
    remote = report["export"]["trust_remote_code_needed"]
    stages = ", ".join(s.summary() if METHODS[s.method].prunes else f"{s.method} recovery" for s in recipe.stages)
    facts = base_model_facts(recipe.model.name)
    flag = ", trust_remote_code=True" if remote else ""
    rows = [f"| parameters | {params['total_before']:,} | {params['total_after']:,} |",
            f"| decoder-linear parameters | {params['decoder_linear_before']:,} | {params['decoder_linear_after']:,} |",
            f"| zeros in decoder linears | – | {report['sparsity']['zero_fraction_decoder_linear']:.1%} |"]
    if ppl.get("pruned") is not None:
        dense = f"{ppl['dense']:.2f}" if ppl.get("dense") is not None else "–"
        rows.append(f"| perplexity ({ppl['windows']}, {ppl['seq_len']} tokens, {ppl['text']}) | "
                    f"{dense} | {ppl['pruned']:.2f} |")
    tasks = report.get("tasks") or {}
    for task in tasks.get("names", []):
        for metric in ("acc", "acc_norm"):
            pruned = (tasks.get("pruned") or {}).get(task, {}).get(metric)
            if pruned is not None:
                dense = (tasks.get("dense") or {}).get(task, {}).get(metric)
                subset = f", first {tasks['limit']} examples" if tasks.get("limit") else ""
                rows.append(f"| {task} {metric} ({tasks['num_fewshot']}-shot{subset}, lm-eval) | "
                            f"{f'{dense:.4f}' if dense is not None else '–'} | {pruned:.4f} |")
    for kind, label in (("forward", "forward tokens/s"), ("generate", "generation tokens/s, batch 1")):
        if speed.get(f"pruned_{kind}_tokens_per_s") is not None:
            dense = speed.get(f"dense_{kind}_tokens_per_s")
            rows.append(f"| {label} | {f'{dense:,.0f}' if dense else '–'} | "
                        f"{speed[f'pruned_{kind}_tokens_per_s']:,.0f} |")
    seconds = (report.get("seconds") or {}).get("prune")
    if seconds is not None:
        rows.append(f"| pruning time (s) | – | {seconds:.0f} |")
    if report.get("peak_rss_mib") is not None:
        rows.append(f"| peak memory of the run (MiB) | – | {report['peak_rss_mib']:,.0f} |")
    plots = ["![per-layer share removed](layers.png)", ""]
    plots += [f"![{name}]({name})" for name in sorted(artifacts or {}) if name.endswith(".png")]
    return "\n".join([
        *_front_matter(recipe, facts),
        f"# {Path(str(recipe.model.name)).name} pruned with compress ({stages})",
        "",
        f"Pruned from `{facts.get('base_model', recipe.model.name)}` by `compress run` "
        f"({report['sparsity']['achieved_decoder_linear']:.1%} of the decoder-linear parameters removed). "
        "The exact recipe is below and in `recipe.yaml`, every measurement in `report.json`.",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        *rows,
        "",
        *plots,
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{PATH}")',
        f'model = AutoModelForCausalLM.from_pretrained("{PATH}"{flag})',
        "```",
        "",
        ("The layers have different widths, so the checkpoint ships `modeling_pruned.py` (read it before "
         f"enabling remote code); the tokenizer needs none. Without remote code: `compress.load(\"{PATH}\")`."
         if remote else "Every layer has the same width, so the stock architecture class loads it."),
        "",
        "## Recipe",
        "",
        "```yaml",
        dump_recipe(recipe).rstrip(),
        "```",
        "",
    ])
