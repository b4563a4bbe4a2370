"""Build a mixture-of-experts test model from SmolLM2-135M by sparse upcycling (no MoE is available offline).

    python docs/upcycle_moe.py OUT_DIR [--experts 4] [--top-k 2] [--seed 0]

Every decoder layer's MLP is copied into `experts` identical experts (Komatsuzaki et al., "Sparse
Upcycling", 2022) behind a random router (normal, std 0.02, seeded); attention, norms and
embeddings are kept. The result is a Mixtral checkpoint (transformers 5 fused expert tensors) that
loads with the stock `MixtralForCausalLM`. Mixtral renormalises the top-k routing weights to sum to
one, so identical experts make the upcycled model compute exactly what the dense model computes
(same perplexity), while each expert still sees only the tokens the router sends it: a real-weight
model on which MoE pruning can be measured against a known dense figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compress.model.loading import builtin_folder, load_model  # noqa: E402


def mixtral_config(dense_config, experts: int, top_k: int, width: int) -> MixtralConfig:
    """A Mixtral config with the dense Llama-family model's attention and `experts` experts of `width`."""
    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=width,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0)


def load_moe_state(moe: MixtralForCausalLM, state: dict, tied: bool, what: str) -> None:
    """Load every tensor of the built MoE (the tied lm_head aside), or stop naming what is missing."""
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not tied]
    if missing or unexpected:
        raise SystemExit(f"{what} failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    moe.tie_weights()


def upcycle(dense, experts: int, top_k: int, seed: int) -> MixtralForCausalLM:
    c = dense.config
    moe = MixtralForCausalLM(mixtral_config(c, experts, top_k, c.intermediate_size))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    for i, layer in enumerate(dense.model.layers):
        mlp = layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).detach()
        prefix = f"model.layers.{i}.mlp"
        state[f"{prefix}.experts.gate_up_proj"] = gate_up[None].repeat(experts, 1, 1)
        state[f"{prefix}.experts.down_proj"] = mlp.down_proj.weight.detach()[None].repeat(experts, 1, 1)
        state[f"{prefix}.gate.weight"] = torch.randn(experts, c.hidden_size, generator=generator) * 0.02
    load_moe_state(moe, state, c.tie_word_embeddings, "upcycling")
    return moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; remove it first")
    source = builtin_folder("smollm2-135m")
    dense, _ = load_model(str(source))
    moe = upcycle(dense, args.experts, args.top_k, args.seed)
    staging = args.output.with_name(f".{args.output.name}.partial-{os.getpid()}")
    moe.save_pretrained(staging)
    AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    staging.rename(args.output)
    shutil.rmtree(staging, ignore_errors=True)
    params = sum(p.numel() for p in moe.parameters())
    print(f"wrote {args.output}: Mixtral, {args.experts} experts (top {args.top_k}), {params:,} parameters")


if __name__ == "__main__":
    main()
