"""Re-run the benchmark rows of docs/benchmarks.md, one run at a time, and print the table rows.

    python docs/bench.py                 # every row (about an hour on 2 CPU cores)
    python docs/bench.py flap_20 wanda_sp_20   # some rows

Each row is one `compress run` under `/usr/bin/time -v` (peak RSS of the whole process); all other
figures come from the run's report.json. Outputs go to $BENCH_DIR (default /tmp/compress-bench).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(os.environ.get("BENCH_DIR", "/tmp/compress-bench"))
MOE_MODEL = OUT / "smollm2-moe4"  # SmolLM2 upcycled to 4 experts (docs/upcycle_moe.py), built on first use
MOE8 = OUT / "smollm2-moe8"  # SmolLM2 split into 8 differing experts, top-6 (docs/moefication.py), built on first use
BUILDERS = {MOE_MODEL: ["upcycle_moe.py"], MOE8: ["moefication.py"]}
COMMON = "model=smollm2-135m --quiet --overwrite"
ROWS = {
    "flap_20": "recipe=flap_20 eval.speed=true",
    "flap_20_full": "recipe=flap_20 ppl=full",
    "flap_20_repeat": "recipe=flap_20",
    # bigger than memory: the same pruning with 29 of 30 layers on disk (ppl=none: the peak of pruning + export;
    # the weights are compared by SHA-256 with the in-memory row)
    "flap_20_memory_noeval": "recipe=flap_20 ppl=none",
    "flap_20_offload_noeval": "recipe=flap_20 ppl=none \"model.max_memory={cpu: 150MB}\"",
    # determinism: same safetensors bytes as flap_20
    "flap_20_offload": "recipe=flap_20 \"model.max_memory={cpu: 150MB}\"",
    "flap_20_bias": "recipe=flap_20 stages.0.compensation=bias",
    "flap_20_self": "recipe=flap_20 calibration=self",
    # the short protocol of tests/test_e2e_smollm2.py (32 x 256 calibration tokens, 4 eval windows)
    "short_flap_20": "recipe=flap_20 calibration.num_samples=32 calibration.seq_len=256 ppl=4 "
                     "stages.0.covariance_token_stride=1",
    "short_flap_20_stride4": "recipe=flap_20 calibration.num_samples=32 calibration.seq_len=256 ppl=4",
    "short_flap_20_bias": "recipe=flap_20 calibration.num_samples=32 calibration.seq_len=256 ppl=4 "
                          "stages.0.compensation=bias",
    "flap_20_uniform": "recipe=flap_20 stages.0.uniform=true eval.speed=true",
    "flap_50": "recipe=flap_50 eval.speed=true",
    "flap_50_bias": "recipe=flap_50 stages.0.compensation=bias",
    "wanda_sp_20": "recipe=wanda_sp_20 eval.speed=true",
    # weight-level sparsity (zeros in place)
    "wanda_50": "recipe=wanda_50",
    "wanda_2_4": "recipe=wanda_50 pattern=2:4",
    "wanda_4_8": "recipe=wanda_50 pattern=4:8",
    "wanda_50_owl": "recipe=wanda_50 stages.0.owl=true",
    "wanda_50_dense_inputs": "recipe=wanda_50 stages.0.inputs=dense",
    "sparsegpt_50": "recipe=sparsegpt_50",
    "sparsegpt_2_4": "recipe=sparsegpt_50 pattern=2:4",
    "sparsegpt_4_8": "recipe=sparsegpt_50 pattern=4:8",
    "sparsegpt_50_dense_inputs": "recipe=sparsegpt_50 stages.0.inputs=dense",
    "sparsegpt_2_4_dense_inputs": "recipe=sparsegpt_50 pattern=2:4 stages.0.inputs=dense",
    "sparsegpt_50_one_pass": "recipe=sparsegpt_50 stages.0.within_layer=false",
    "sparsegpt_2_4_one_pass": "recipe=sparsegpt_50 pattern=2:4 stages.0.within_layer=false",
    "sparsegpt_2_4_norefit": "recipe=sparsegpt_50 pattern=2:4 stages.0.refit_iterations=0",
    "sparsegpt_50_norefit": "recipe=sparsegpt_50 stages.0.refit_iterations=0",
    "magnitude_50": "recipe=wanda_50 stages.0.method=magnitude",
    "magnitude_2_4": "recipe=wanda_50 stages.0.method=magnitude pattern=2:4",
    "gblm_50": "recipe=gblm_50",
    "gblm_2_4": "recipe=gblm_50 pattern=2:4",
    "flap_20_wanda_2_4": "recipe=flap_20_wanda_2_4",
    "wanda_2_4_dense_inputs": "recipe=wanda_50 pattern=2:4 stages.0.inputs=dense",
    "gblm_50_dense_inputs": "recipe=gblm_50 stages.0.inputs=dense",
    "gblm_2_4_dense_inputs": "recipe=gblm_50 pattern=2:4 stages.0.inputs=dense",
    # CFSP (structured)
    "cfsp_20": "recipe=cfsp_20",
    "cfsp_50": "recipe=cfsp_20 sparsity=0.5",
    # Týr: searched per-layer sparsity; the even spread without search; the released code's dense inputs
    "tyr_50": "recipe=tyr_50",
    "tyr_50_no_search": "recipe=tyr_50 stages.0.rounds=1 stages.0.generations=0",
    "tyr_50_dense_inputs": "recipe=tyr_50 stages.0.accumulation=dense",
    "tyr_20": "recipe=tyr_50 sparsity=0.2",
    "tyr_20_dense_inputs": "recipe=tyr_50 sparsity=0.2 stages.0.accumulation=dense",
    "cfsp_20_both": "recipe=cfsp_20 stages.0.targets=both",
    "cfsp_50_both": "recipe=cfsp_20 sparsity=0.5 stages.0.targets=both",
    "cfsp_20_released": "recipe=cfsp_20 stages.0.score=released stages.0.compensation=none",
    # recovery (LoRA, 200 steps x 8 x 256 tokens of wiki.valid.tokens)
    "flap_50_lora": "recipe=flap_50_lora",
    "cfsp_50_lora": "recipe=flap_50_lora stages.0.method=cfsp",
    "cfsp_50_lora_importance": "recipe=flap_50_lora stages.0.method=cfsp stages.1.rank_allocation=importance",
    # second architecture: Gemma-3-270M (1 KV head: FLAP keeps the attention and prunes the MLP)
    "gemma_flap_20": "recipe=flap_20 model=gemma3-270m",
    "gemma_wanda_2_4": "recipe=wanda_50 pattern=2:4 model=gemma3-270m",
    # the same runs without gradient checkpointing (memory is no concern at 135M): same updates, ~25% less time
    "flap_50_lora_nockpt": "recipe=flap_50_lora stages.1.gradient_checkpointing=false",
    "cfsp_50_lora_importance_nockpt": "recipe=flap_50_lora stages.0.method=cfsp stages.1.rank_allocation=importance "
                                      "stages.1.gradient_checkpointing=false",
    # mixture of experts: SmolLM2 upcycled to a Mixtral with 4 identical experts, top-2 (dense ppl = SmolLM2's)
    "moe_flap_20": f"recipe=flap_20 model={MOE_MODEL}",
    "moe_wanda_2_4": f"recipe=wanda_50 pattern=2:4 model={MOE_MODEL}",
    "wanda_2_4_lora": "recipe=flap_50_lora \"stages.0={method: wanda, pattern: '2:4'}\"",
    # LoRAPrune: pruning while LoRA trains, the same 200 x 8 x 256-token budget as flap_50_lora (no checkpointing,
    # as flap_50_lora_nockpt)
    "loraprune_50_nockpt": "recipe=loraprune_20 sparsity=0.5 stages.0.gradient_checkpointing=false",
    "loraprune_20_nockpt": "recipe=loraprune_20 stages.0.gradient_checkpointing=false",
    # the FLAP -> LoRA and CFSP -> LoRA rows at LoRAPrune 20%'s sparsity and budget
    "flap_20_lora_nockpt": "recipe=flap_50_lora stages.0.sparsity=0.2 stages.1.gradient_checkpointing=false",
    "cfsp_20_lora_nockpt": "recipe=flap_50_lora stages.0.method=cfsp stages.0.sparsity=0.2 "
                           "stages.1.gradient_checkpointing=false",
    # ARMOR 2:4 from our SparseGPT 2:4, iterations within a wall-clock budget so that the whole pruning stays
    # under the official code's 1,292 s (its 250 iterations at block 64): the default (full-Hessian loss on
    # SparseGPT's Hessians), the paper's diagonal proxy from the same start, the paper's algorithm (NoWag-P start)
    "armor_2_4_budget": "recipe=armor_2_4 stages.0.time_budget_s=900",
    "armor_2_4_diagonal_budget": "recipe=armor_2_4 stages.0.hessian=diagonal stages.0.inputs=dense "
                                 "stages.0.time_budget_s=850",
    "armor_2_4_paper_budget": "recipe=armor_2_4 stages.0.init=nowag stages.0.hessian=diagonal stages.0.inputs=dense "
                              "stages.0.time_budget_s=850",
    # the init ablation with the default loss: NoWag-P's mask (fixed under hessian=full) instead of SparseGPT's
    "armor_2_4_nowag_budget": "recipe=armor_2_4 stages.0.init=nowag stages.0.time_budget_s=900",
    "armor_2_4_block32_budget": "recipe=armor_2_4 stages.0.block_size=32 stages.0.time_budget_s=900",
    # quality against search time (every stack in memory at once, the model measured at each point)
    "armor_2_4_curve": "recipe=armor_2_4 stages.0.iterations=600 \"stages.0.eval_at=[0, 100, 250, 400, 600]\"",
    # STUN on the MoEfied SmolLM2 (8 experts that differ, top-6): whole experts removed by STUN and by its
    # baselines at the same count; the dense MoE's ppl is measured once (moe8_stun_25), the others skip it
    **{f"moe8_{selection}_{percent}": f"recipe=stun_25 model={MOE8} \"stages=[{{method: stun, sparsity: 0.{percent}, "
                                      f"selection: {selection}}}]\"" + ("" if (selection, percent) == ("stun", 25)
                                                                         else " eval.dense=false")
       for percent in (25, 50) for selection in ("stun", "frequency", "reap", "random")},
    "moe8_stun_25_coactivation": f"recipe=stun_25 model={MOE8} \"stages=[{{method: stun, sparsity: 0.25, "
                                 f"coactivation: 0.5}}]\" eval.dense=false",
    "moe8_stun_25_routed": f"recipe=stun_25 model={MOE8} \"stages=[{{method: stun, sparsity: 0.25, "
                           f"representative: routed}}]\" eval.dense=false",
    **{f"moe8_stun_{percent}_reap_representative": f"recipe=stun_25 model={MOE8} \"stages=[{{method: stun, "
                                                   f"sparsity: 0.{percent}, representative: reap}}]\" eval.dense=false"
       for percent in (25, 50)},
    "moe8_stun_25_merge": f"recipe=stun_25 model={MOE8} \"stages=[{{method: stun, sparsity: 0.25, merge: true}}]\" "
                          f"eval.dense=false",
    "moe8_stun_25_global": f"recipe=stun_25 model={MOE8} \"stages=[{{method: stun, sparsity: 0.25, budget: global}}]\" "
                           f"eval.dense=false",
    # then unstructured inside the experts left, to 50% of the decoder linears in all, against Wanda alone
    "moe8_stun_25_wanda_50": f"recipe=stun_25 model={MOE8} eval.dense=false",
    "moe8_wanda_50": f"recipe=wanda_50 model={MOE8} eval.dense=false",
    "moe8_stun_25_wanda_50_owl": f"recipe=stun_25 model={MOE8} stages.1.owl=true eval.dense=false",
    "moe8_wanda_50_owl": f"recipe=wanda_50 model={MOE8} stages.0.owl=true eval.dense=false",
}


def timed(command: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run under `/usr/bin/time -v`: (the finished process, wall seconds, peak RSS MiB of the whole process)."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *map(str, command)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return result, seconds, int(found.group(1)) / 1024 if found else float("nan")


def curve_lines(report: dict) -> list[str]:
    """A stage's quality-vs-time curve (ARMOR's eval_at) as a table and a mermaid chart (GitHub renders it)."""
    curve = next((stage["curve"] for stage in report["stages"] if stage.get("curve")), None)
    if not curve:
        return []
    lines = ["| iteration | search s | quick ppl |", "|---|---|---|"]
    lines += [f"| {point['iteration']} | {point['seconds']:.0f} | {point['ppl']:.2f} |" for point in curve]
    seconds = ", ".join(str(round(point["seconds"])) for point in curve)
    ppl = ", ".join(f"{point['ppl']:.2f}" for point in curve)
    lines += ["", "```mermaid", "xychart-beta", '    title "quick ppl against search seconds"',
              f'    x-axis "search s" [{seconds}]', '    y-axis "quick ppl"', f"    line [{ppl}]", "```"]
    return lines


def run_row(name: str) -> str:
    output = OUT / name
    for model, script in BUILDERS.items():
        if f"model={model} " in f"{ROWS[name]} " and not model.exists():
            subprocess.run([sys.executable, str(Path(__file__).parent / script[0]), str(model)], check=True)
    common = COMMON if " model=" not in f" {ROWS[name]}" else COMMON.replace("model=smollm2-135m ", "")
    command = f"compress run {ROWS[name]} {common} output={output}"
    result, _seconds, rss_mib = timed(shlex.split(command))
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
    rss_kib = rss_mib * 1024
    report = json.loads((output / "report.json").read_text())
    ppl, speed = report["ppl"], report["speed"]
    dense = "–" if ppl.get("dense") is None else f"{ppl['dense']:.2f}"  # eval.dense=false: measured in another row
    if "pruned" not in ppl:  # no evaluation: memory and identity of the weights
        digest = hashlib.sha256((output / "model.safetensors").read_bytes()).hexdigest()[:16]
        return (f"| {name} | {report['sparsity']['achieved_decoder_linear']:.2%} | {report['seconds']['prune']:.0f} | "
                f"{rss_kib / 1024:,.0f} | {report['peak_rss_mib_by_phase']} | {digest} | `{command}` |")
    for line in curve_lines(report):
        print(line, flush=True)
    recovery = next((stage for stage in report["stages"] if "ppl_before" in stage), None)
    if recovery is not None:
        return (f"| {name} | {report['sparsity']['achieved_decoder_linear']:.2%} | {dense} | "
                f"{recovery['ppl_before']:.2f} | {ppl['pruned']:.2f} | {recovery['trainable_params']:,} | "
                f"{recovery['train_seconds'] / 60:.1f} | {report['seconds']['prune'] / 60:.1f} | "
                f"{rss_kib / 1024:,.0f} | `{command}` |")
    experts = next((stage for stage in report["stages"] if "experts_after" in stage), None)
    if experts is not None:  # expert removal (STUN and its baselines), maybe with a weight stage after it
        removed = experts.get("routed_picks_removed")
        zeros = report["sparsity"]["zero_fraction_decoder_linear"]
        removed_params = report["sparsity"]["achieved_decoder_linear"]
        return (f"| {name} | {experts['config']['selection']} | {experts['experts_after']} of "
                f"{experts['experts_before']} | {'–' if removed is None else f'{removed:.1%}'} | "
                f"{removed_params:.2%} | {removed_params + (1 - removed_params) * zeros:.2%} | {dense} | "
                f"{ppl['pruned']:.2f} | {report['seconds']['prune']:.0f} | {rss_kib / 1024:,.0f} | `{command}` |")
    if any("pattern" in stage for stage in report["stages"]):
        return (f"| {name} | {report['sparsity']['achieved_decoder_linear']:.2%} | "
                f"{report['sparsity']['zero_fraction_decoder_linear']:.2%} | {dense} | "
                f"{ppl['pruned']:.2f} | {report['seconds']['prune']:.0f} | {rss_kib / 1024:,.0f} | `{command}` |")
    ratio = (f"{speed['forward_speedup']:.2f} / {speed['generate_speedup']:.2f}" if "forward_speedup" in speed else "–")
    prune = f"{report['seconds']['prune']:.0f}"
    if report["seconds"]["calibration_data"] > 10:  # self-generated calibration text: say what it cost
        prune += f" (of which generation {report['seconds']['calibration_data']:.0f})"
    return (f"| {name} | {report['sparsity']['achieved_decoder_linear']:.2%} | {report['params']['total_after']:,} | "
            f"{dense} | {ppl['pruned']:.2f} | {prune} | {rss_kib / 1024:,.0f} | "
            f"{ratio} | `{command}` |")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    print("structured rows: | row | sparsity | params | dense ppl | pruned ppl | prune s | peak RSS MiB | "
          "speed fwd / gen | command |")
    print("recovery rows: | row | sparsity | dense ppl | before | after | LoRA params | train min | whole prune+train "
          "min | peak RSS MiB | command |")
    print("expert rows: | row | selection | experts left | routed picks removed | params removed | removed + zeros | "
          "dense ppl | pruned ppl | prune s | peak RSS MiB | command |")
    print("weight-level rows: | row | params removed | zeros in decoder linears | dense ppl | pruned ppl | prune s | "
          "peak RSS MiB | command |")
    for row in sys.argv[1:] or ROWS:
        print(run_row(row), flush=True)
