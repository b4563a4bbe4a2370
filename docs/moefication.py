"""Build a mixture-of-experts model whose experts differ and whose router routes, from SmolLM2-135M's
real weights, offline (MoEfication, Zhang et al., ACL Findings 2022, adapted to gated MLPs):

    python docs/moefication.py OUT_DIR [--experts 8] [--top-k 6] [--tokens 16384] [--seed 1]

No trained MoE small enough for this machine is available offline, and the upcycled model of
`docs/upcycle_moe.py` has identical experts, on which any expert pruning is lossless. Here every
decoder layer's MLP is split instead:

1. Run SmolLM2 on `--tokens` tokens of `wiki.valid` (packaged WikiText-2; offsets from `--seed`, not
   the benchmark's calibration offsets) and keep each MLP's input x and activation h = act(gate x) * up x.
2. Experts = channels that fire together: each channel's profile |h_j| over the tokens (unit norm),
   balanced spherical k-means into `--experts` clusters of equal size (assignment by scipy's
   linear_sum_assignment, so every expert has the same width). Expert e holds the gate/up rows and
   down_proj columns of its channels: a disjoint split, so the sum of all experts is the dense MLP.
3. Router: expert e's output norm ||down[:, C_e] h[C_e]|| per token is regressed on x by ridge least
   squares; the router ranks experts by the prediction. Mixtral's routing weights are the top-k
   softmax renormalised to 1, so the experts' down projections are scaled by k and the router logits
   by a temperature `alpha` picked on held-out calibration windows (the mean next-token loss over
   8 windows of wiki.valid, never the test text): a small alpha makes the top-k weights near 1/k
   (each chosen expert counts fully, as in MoEfication), a larger one lets the router weigh them.
4. Saved as a stock Mixtral checkpoint (transformers 5 fused expert tensors), with
   `moefication.json`: routing accuracy (share of each token's true top-k experts the router picks),
   routing entropy (per token, and of the expert load), pairwise similarity of the experts (cosine of
   their outputs on the same tokens, and of their router rows), and the held-out loss per alpha.

What a reader should know: each token uses k/E of the MLP channels, so the MoE is worse than SmolLM2
(its dense perplexity is in docs/benchmarks.md), and no router or expert was trained.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from transformers import AutoTokenizer, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from calibration.data import sample_windows, tokenize_text  # noqa: E402
from calibration.datasets import named_text  # noqa: E402
from compress.model.loading import builtin_folder, load_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upcycle_moe import load_moe_state, mixtral_config  # noqa: E402  (the same Mixtral layout as the upcycled MoE)

ALPHAS = (0.01, 0.1, 0.3, 1.0, 3.0)


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster of each row of `features` [n, d] (unit rows), every cluster exactly n / clusters rows."""
    n = features.shape[0]
    if n % clusters:
        raise SystemExit(f"{n} channels do not split into {clusters} equal experts")
    size = n // clusters
    generator = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=generator)[:clusters]].clone()
    assignment = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        similarity = features @ centroids.T  # [n, clusters]
        cost = -similarity.repeat_interleave(size, dim=1).double().numpy()  # one column per slot
        _, slots = linear_sum_assignment(cost)
        new = torch.as_tensor(slots, dtype=torch.long) // size
        if torch.equal(new, assignment):
            break
        assignment = new
        for c in range(clusters):
            centroid = features[assignment == c].mean(0)
            centroids[c] = centroid / centroid.norm().clamp_min(1e-12)
    return assignment


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Router rows W [experts, hidden] with x W^T ~ target (ridge least squares, float64)."""
    x64, t64 = x.double(), target.double()
    gram = x64.T @ x64
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x64.T @ t64).T.float()


def split_layer(mlp, x: torch.Tensor, experts: int, seed: int):
    """(gate_up [E, 2w, hidden], down [E, hidden, w] unscaled, router rows [E, hidden], facts) of one MLP."""
    gate, up, down = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
    h = mlp.act_fn(x @ gate.T) * (x @ up.T)  # [tokens, width]
    profile = h.abs().T
    profile = profile / profile.norm(dim=1, keepdim=True).clamp_min(1e-12)
    assignment = balanced_kmeans(profile, experts, seed=seed)
    channels = [torch.nonzero(assignment == e).flatten() for e in range(experts)]
    outputs = torch.stack([h[:, c] @ down[:, c].T for c in channels])  # [E, tokens, hidden]
    norms = outputs.norm(dim=-1).T  # [tokens, E]
    router = fit_router(x, norms)
    gate_up = torch.stack([torch.cat([gate[c], up[c]], 0) for c in channels])
    down_e = torch.stack([down[:, c] for c in channels])
    return gate_up, down_e, router, {"outputs": outputs, "norms": norms, "x": x}


def routing_facts(router: torch.Tensor, x: torch.Tensor, norms: torch.Tensor, outputs: torch.Tensor,
                  top_k: int) -> dict:
    experts = router.shape[0]
    picked = torch.topk(x @ router.T, top_k, dim=1).indices
    best = torch.topk(norms, top_k, dim=1).indices
    hits = (picked[:, :, None] == best[:, None, :]).any(-1).float().mean().item()
    load = torch.bincount(picked.flatten(), minlength=experts).double()
    load = load / load.sum()
    logits = x @ router.T
    probabilities = torch.softmax(logits / logits.std(), dim=-1)  # the shape of routing at unit temperature
    token_entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1).mean().item()
    flat = outputs.permute(1, 0, 2)  # [tokens, E, hidden]
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    output_cos = torch.einsum("tih,tjh->ij", unit, unit) / unit.shape[0]
    rows = router / router.norm(dim=1, keepdim=True)
    router_cos = rows @ rows.T
    off = ~torch.eye(experts, dtype=torch.bool)
    return {"router_top_k_recall": hits,
            "load_entropy_over_log_e": (-(load * load.clamp_min(1e-12).log()).sum() / math.log(experts)).item(),
            "token_entropy_over_log_e": token_entropy / math.log(experts),
            "expert_output_cosine_mean": output_cos[off].mean().item(),
            "expert_output_cosine_max": output_cos[off].max().item(),
            "router_row_cosine_mean": router_cos[off].mean().item(),
            "router_row_cosine_max": router_cos[off].max().item()}


def mlp_inputs(dense, windows: torch.Tensor, tokens: int) -> list[torch.Tensor]:
    """Each decoder layer's MLP input on `windows`, `tokens` rows evenly strided."""
    kept = [[] for _ in dense.model.layers]
    def keep(index):
        return lambda _module, args: kept[index].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.mlp.register_forward_pre_hook(keep(i)) for i, layer in enumerate(dense.model.layers)]
    try:
        with torch.no_grad():
            for start in range(0, len(windows), 4):
                dense(input_ids=windows[start:start + 4], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    inputs = [torch.cat(rows) for rows in kept]
    stride = max(1, inputs[0].shape[0] // tokens)
    return [x[::stride][:tokens] for x in inputs]


def moefy(dense, windows: torch.Tensor, experts: int, top_k: int, tokens: int, seed: int, log=print):
    """(Mixtral with unit-temperature router, scaled experts; per-layer facts) from a dense Llama-family model."""
    moe = MixtralForCausalLM(mixtral_config(dense.config, experts, top_k, dense.config.intermediate_size // experts))
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    facts = []
    with torch.no_grad():
        for i, (layer, x) in enumerate(zip(dense.model.layers, mlp_inputs(dense, windows, tokens))):
            gate_up, down, router, data = split_layer(layer.mlp, x, experts, seed + i)
            prefix = f"model.layers.{i}.mlp"
            state[f"{prefix}.experts.gate_up_proj"] = gate_up
            state[f"{prefix}.experts.down_proj"] = down * top_k
            scale = (data["x"] @ router.T).std().clamp_min(1e-12)
            state[f"{prefix}.gate.weight"] = router / scale  # unit-std logits; `set_alpha` scales them
            facts.append(routing_facts(router, data["x"], data["norms"], data["outputs"], top_k))
            log(f"layer {i}: router recall {facts[-1]['router_top_k_recall']:.2f}, "
                f"expert output cosine {facts[-1]['expert_output_cosine_mean']:.3f}")
    load_moe_state(moe, state, dense.config.tie_word_embeddings, "MoEfication")
    return moe, facts


def set_alpha(moe, alpha: float, previous: float = 1.0) -> None:
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.mul_(alpha / previous)


def held_out_loss(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None], use_cache=False).loss.item() for w in windows]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16384, help="MLP input rows per layer for clustering and router")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; remove it first")
    torch.manual_seed(args.seed)
    source = builtin_folder("smollm2-135m")
    dense, tokenizer = load_model(str(source))
    dense.eval()
    ids = tokenize_text(tokenizer, named_text("wikitext2", "calibration"))
    windows = sample_windows(ids, 40, 512, args.seed)
    fit, held = windows[:32], windows[32:]
    moe, facts = moefy(dense, fit, args.experts, args.top_k, args.tokens, args.seed)
    moe.eval()
    losses, previous = {}, 1.0
    for alpha in ALPHAS:
        set_alpha(moe, alpha, previous)
        previous = alpha
        losses[alpha] = held_out_loss(moe, held)
        print(f"alpha {alpha}: held-out loss {losses[alpha]:.4f}")
    best = min(losses, key=losses.get)
    set_alpha(moe, best, previous)
    dense_loss = held_out_loss(dense, held)
    staging = args.output.with_name(f".{args.output.name}.partial-{os.getpid()}")
    moe.save_pretrained(staging)
    AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    summary = {key: sum(f[key] for f in facts) / len(facts) for key in facts[0]}
    record = {"source": "smollm2-135m", "experts": args.experts, "top_k": args.top_k, "tokens": args.tokens,
              "seed": args.seed, "alpha": best, "held_out_loss_by_alpha": {str(a): v for a, v in losses.items()},
              "held_out_loss_dense": dense_loss, "mean_over_layers": summary, "per_layer": facts,
              "command": " ".join(["python", "docs/moefication.py", *sys.argv[1:]])}
    (staging / "moefication.json").write_text(json.dumps(record, indent=2) + "\n")
    staging.rename(args.output)
    shutil.rmtree(staging, ignore_errors=True)
    print(json.dumps({k: v for k, v in record.items() if k != "per_layer"}, indent=2))


if __name__ == "__main__":
    main()
