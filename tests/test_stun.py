"""STUN's expert stage (compress/methods/stun.py): whole experts removed, router rows sliced, top-k kept
valid, exports of every MoE family reloading (stock config when every layer keeps the same count);
planted duplicate experts are exactly what STUN removes; the baselines pick what they promise."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

import compress
from calibration.routing import RoutingStats
from compress.arch import get_adapter
from compress.errors import UserError
from compress.methods.stun import StunConfig, clusters_after, expert_distance, merge_tree
from tests.conftest import TINY_MOE_ARCHITECTURES, tiny_model
from tests.test_architectures import _logits as logits
from tests.test_architectures import _recipe as recipe
from tests.test_architectures import load_as_users_do
from tests.test_moe import idle_expert_mixtral, save


def run(model_dir, text_files, output, stages):
    return compress.run(recipe(model_dir, text_files, output, stages), progress=False, log=lambda _: None)


def duplicated_mixtral(noise: float, distinct: int = 3, seed: int = 0, duplicated_layers=(0, 1, 2)):
    """Top-1 Mixtral whose experts distinct..2*distinct-1 are copies of 0..distinct-1 (weights and router
    rows) plus `noise` x their scale; layers not in `duplicated_layers` keep 2*distinct random experts."""
    config = MixtralConfig(vocab_size=320, hidden_size=96, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                           tie_word_embeddings=True, num_local_experts=2 * distinct, num_experts_per_tok=1)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.mlp.gate.weight.normal_(0, 0.5)
            if index not in duplicated_layers:
                continue
            for tensor in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, layer.mlp.gate.weight):
                tensor[distinct:] = tensor[:distinct] + noise * tensor[:distinct].std() * torch.randn_like(
                    tensor[:distinct])
    return model


def test_stun_removes_exactly_the_planted_duplicates_and_the_output_moves_less_than_the_noise(text_files, tmp_path):
    noisy, exact = duplicated_mixtral(0.01), duplicated_mixtral(0.0)
    noise_effect = (logits(noisy) - logits(exact)).abs().max().item()
    assert noise_effect > 0
    model_dir = save(noisy, tmp_path / "model")
    output = tmp_path / "out"
    report = run(model_dir, text_files, output, [{"method": "stun", "experts_to_keep": 3}])
    stage = report["stages"][0]
    for entry in stage["layers"].values():  # each original with its copy; one of each pair kept
        assert entry["clusters"] == [[0, 3], [1, 4], [2, 5]]
        assert [kept % 3 for kept in entry["kept"]] == [0, 1, 2]
    pruned = compress.load(output)
    assert pruned.model.layers[0].mlp.gate.weight.shape[0] == 3
    assert (logits(pruned) - logits(noisy)).abs().max().item() < 2 * noise_effect
    # the baselines know nothing of the duplicates: on the same model frequency keeps some pair
    frequency = run(model_dir, text_files, tmp_path / "frequency",
                    [{"method": "stun", "experts_to_keep": 3, "selection": "frequency"}])
    assert any(sorted(k % 3 for k in entry["kept"]) != [0, 1, 2] for entry in frequency["stages"][0]["layers"].values())


def test_a_cluster_keeps_the_representative_the_option_names(text_files, tmp_path):
    model = duplicated_mixtral(0.01)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[3] *= 3.0  # the copy of expert 0 contributes 3x as much per token
    model_dir = save(model, tmp_path / "model")
    for representative in ("reap", "routed"):
        report = run(model_dir, text_files, tmp_path / representative,
                     [{"method": "stun", "experts_to_keep": 3, "representative": representative}])
        for entry in report["stages"][0]["layers"].values():
            assert entry["clusters"][0] == [0, 3]
            tokens = entry["routed_tokens"]
            assert tokens[0] > 0 and tokens[3] > 0
            expected = 3 if representative == "reap" else (0 if tokens[0] >= tokens[3] else 3)
            assert entry["kept"][0] == expected, (representative, entry)


def test_a_layer_cut_below_top_k_routes_to_every_expert_left_and_exports_the_stock_config(text_files, tmp_path):
    model_dir = save(tiny_model("mixtral"), tmp_path / "model")  # 4 experts, top-2
    output = tmp_path / "out"
    report = run(model_dir, text_files, output, [{"method": "stun", "experts_to_keep": 1}])
    assert report["stages"][0]["experts_after"] == 3
    config = json.loads((output / "config.json").read_text())
    assert config["num_local_experts"] == 1 and config["num_experts_per_tok"] == 1 and "auto_map" not in config
    stock = AutoModelForCausalLM.from_pretrained(output)
    gate = stock.model.layers[0].mlp.gate
    assert gate.weight.shape[0] == 1 and gate.top_k == 1
    assert torch.isfinite(logits(stock)).all()


@pytest.mark.parametrize("model_type", TINY_MOE_ARCHITECTURES)
def test_uniform_counts_export_the_stock_config_in_every_moe_family(model_type, text_files, tmp_path):
    model_dir = save(tiny_model(model_type), tmp_path / "model")
    output = tmp_path / "out"
    report = run(model_dir, text_files, output, [{"method": "stun", "experts_to_keep": 3},
                                                 {"method": "wanda", "sparsity": 0.5}])
    assert report["export"]["format"] == "stock" and report["export"]["reload_max_abs_logit_diff"] < 1e-4
    config = json.loads((output / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 3
    stock = AutoModelForCausalLM.from_pretrained(output)
    assert (logits(stock) - logits(compress.load(output))).abs().max() < 1e-4
    load_as_users_do(output, per_layer=False)


@pytest.mark.parametrize("model_type", TINY_MOE_ARCHITECTURES)
def test_a_global_budget_takes_more_experts_from_the_redundant_layer_and_exports_per_layer(model_type, text_files,
                                                                                            tmp_path):
    model = tiny_model(model_type)
    with torch.no_grad():  # layer 1: experts 2, 3 are copies of 0, 1 (router rows too)
        mlp = model.model.layers[1].mlp
        for tensor in (mlp.experts.gate_up_proj, mlp.experts.down_proj, mlp.gate.weight):
            tensor[2:] = tensor[:2]
    model_dir = save(model, tmp_path / "model")
    output = tmp_path / "out"
    report = run(model_dir, text_files, output, [{"method": "stun", "sparsity": 0.25, "budget": "global"}])
    left = {i: len(entry["clusters"]) for i, entry in report["stages"][0]["layers"].items()}
    assert sum(left.values()) == 9 and left["1"] == 2
    assert report["export"]["format"] == "per_layer" and report["export"]["reload_max_abs_logit_diff"] < 1e-4
    config = json.loads((output / "config.json").read_text())
    key = "num_experts" if model_type == "olmoe" else "num_local_experts"
    assert [config["per_layer_config"][str(i)][key] for i in range(3)] == [left[str(i)] for i in range(3)]
    ours = compress.load(output)
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in ours.model.layers] == [left[str(i)] for i in range(3)]
    load_as_users_do(output, per_layer=True)


def test_baselines_remove_what_they_promise(text_files, tmp_path):
    model = idle_expert_mixtral()  # 5 experts, top-2; the router never picks expert 4
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.down_proj[0] *= 1e-3  # expert 0 outputs almost nothing
    model_dir = save(model, tmp_path / "model")

    runs = iter(range(100))

    def kept(selection, count, seed=0):
        report = run(model_dir, text_files, tmp_path / f"{selection}-{seed}-{next(runs)}",
                     [{"method": "stun", "experts_to_keep": count, "selection": selection, "seed": seed}])
        return [entry["kept"] for entry in report["stages"][0]["layers"].values()], report

    assert all(4 not in layer for layer in kept("frequency", 4)[0])
    assert all(0 not in layer and 4 not in layer for layer in kept("reap", 3)[0])
    first, report = kept("random", 3)
    assert first == kept("random", 3)[0]
    assert len({str(kept("random", 3, seed)[0]) for seed in range(4)}) > 1
    assert 0 < report["stages"][0]["routed_picks_removed"] < 1


def test_merge_replaces_a_cluster_by_its_routing_share_mean(text_files, tmp_path):
    model = duplicated_mixtral(0.3)
    model_dir = save(model, tmp_path / "model")
    output = tmp_path / "out"
    report = run(model_dir, text_files, output, [{"method": "stun", "experts_to_keep": 3, "merge": True}])
    merged = compress.load(output).model.layers[0].mlp
    original = model.model.layers[0].mlp
    layer = report["stages"][0]["layers"]["0"]
    assert layer["kept"] is None and layer["clusters"] == [[0, 3], [1, 4], [2, 5]]
    counts = torch.tensor(layer["routed_tokens"], dtype=torch.float32)
    for new, members in enumerate(layer["clusters"]):
        share = counts[members] / counts[members].sum()
        assert 0 < share[0] < 1  # the pair's tokens split unevenly between the two, not 0/1
        for merged_tensor, tensor in ((merged.experts.down_proj, original.experts.down_proj),
                                      (merged.experts.gate_up_proj, original.experts.gate_up_proj),
                                      (merged.gate.weight, original.gate.weight)):
            expected = share[0] * tensor[members[0]] + share[1] * tensor[members[1]]
            assert torch.allclose(merged_tensor[new], expected, atol=1e-6)


def test_a_global_budget_respects_min_experts_for_every_selection(text_files, tmp_path):
    model_dir = save(tiny_model("qwen3_moe"), tmp_path / "model")
    for selection in ("stun", "frequency", "reap", "random"):
        report = run(model_dir, text_files, tmp_path / selection,
                     [{"method": "stun", "sparsity": 0.6, "budget": "global", "min_experts": 2,
                       "selection": selection}])
        left = [len(entry["clusters"]) for entry in report["stages"][0]["layers"].values()]
        assert sum(left) == 6 and min(left) >= 2, (selection, left)  # round(0.4 x 12) = 5, but 2 per layer


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_an_offloaded_moe_loses_the_same_experts_as_in_memory(budget, text_files, tmp_path):
    from safetensors.torch import load_file

    from tests.test_offload import FORCE_DISK

    model_dir = save(tiny_model("mixtral"), tmp_path / "model")
    stages = [{"method": "stun", "sparsity": 0.5, "budget": budget}]
    weights = []
    for name, placement in (("memory", {}), ("disk", {"max_memory": FORCE_DISK,
                                                      "offload_folder": str(tmp_path / "offload")})):
        spec = recipe(model_dir, text_files, tmp_path / name, stages)
        spec["model"].update(placement)
        compress.run(spec, progress=False, log=lambda _: None)
        weights.append(load_file(tmp_path / name / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_clusters_follow_complete_linkage():
    distance = torch.tensor([[0, 1, 9, 9], [1, 0, 9, 9], [9, 9, 0, 2], [9, 9, 2, 0]], dtype=torch.float64)
    heights, pairs = merge_tree(distance)
    assert heights == [1.0, 2.0, 9.0]
    assert clusters_after(pairs, 4, 1) == [[0, 1], [2], [3]]
    assert clusters_after(pairs, 4, 2) == [[0, 1], [2, 3]]
    assert clusters_after(pairs, 4, 3) == [[0, 1, 2, 3]]


def test_distance_mixes_router_rows_and_coactivation():
    router = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    stats = RoutingStats.empty(router)
    stats.counts += torch.tensor([10.0, 10.0, 10.0])
    stats.coactivation += torch.tensor([[10.0, 10.0, 0.0], [10.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    by_rows = expert_distance(router, stats, 0.0)
    by_coactivation = expert_distance(router, stats, 1.0)
    assert by_rows[0, 2] < by_rows[0, 1]  # close router rows
    assert by_coactivation[0, 1] == 0 and by_coactivation[0, 2] == 1  # always together / never
    assert torch.equal(by_rows, by_rows.T) and by_rows.diagonal().abs().max() == 0


def test_recipe_mistakes_are_refused_before_loading(tiny_model_dir, text_files, tmp_path):
    with pytest.raises(UserError, match="has none"):
        run(tiny_model_dir, text_files, tmp_path / "dense", [{"method": "stun"}])
    model_dir = save(tiny_model("mixtral"), tmp_path / "model")
    with pytest.raises(UserError, match="more than the model's 4 experts"):
        run(model_dir, text_files, tmp_path / "many", [{"method": "stun", "experts_to_keep": 5}])
    for bad, message in (({"sparsity": 0.5, "experts_to_keep": 2}, "not both"),
                         ({"budget": "global", "inputs": "sequential"}, "inputs=dense"),
                         ({"selection": "reap", "merge": True}, "makes none"),
                         ({"experts_to_keep": 1.5}, "at most 1")):
        with pytest.raises(ValueError, match=message):
            StunConfig(**bad)


def test_the_routing_statistics_match_a_by_hand_count_and_reap(text_files, tmp_path):
    from calibration.routing import routing_stats
    from compress.arch.moe import routed_experts

    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    layer = adapter.layers()[0]
    hidden = torch.randn(2, 7, 96)
    with torch.no_grad(), routed_experts([adapter.experts(layer)]), routing_stats(adapter, layer) as stats:
        layer.mlp(hidden)
    assert stats.tokens == 14 and stats.counts.sum() == 14 * 2
    assert torch.equal(stats.coactivation.diagonal(), stats.counts)
    assert stats.probability.sum().item() == pytest.approx(14)
    with torch.no_grad():  # by hand: the router's top-2, each expert's output, routing weight x its norm
        flat = hidden.reshape(-1, 96)
        _, weights, indices = layer.mlp.gate(flat)
        experts = layer.mlp.experts
        width = experts.down_proj.shape[-1]
        for e in range(4):
            token, position = torch.where(indices == e)
            gate_up = flat[token] @ experts.gate_up_proj[e].T
            out = (experts.act_fn(gate_up[:, :width]) * gate_up[:, width:]) @ experts.down_proj[e].T
            reap = (weights[token, position].double() * out.double().norm(dim=-1)).sum()
            assert stats.counts[e] == len(token)
            assert stats.reap[e].item() == pytest.approx(reap.item(), rel=1e-5)


def test_a_weight_stage_after_expert_removal_can_aim_at_the_models_total(text_files, tmp_path):
    model_dir = save(tiny_model("mixtral"), tmp_path / "model")
    wanda = {"method": "wanda", "sparsity_of": "model"}
    report = run(model_dir, text_files, tmp_path / "out", [{"method": "stun", "experts_to_keep": 3},
                                                           {**wanda, "sparsity": 0.5}])
    removed, zeros = (report["sparsity"][k] for k in ("achieved_decoder_linear", "zero_fraction_decoder_linear"))
    assert 0.1 < removed < 0.5
    assert removed + (1 - removed) * zeros == pytest.approx(0.5, abs=0.005)
    assert report["stages"][1]["stage_sparsity"] == pytest.approx((0.5 - removed) / (1 - removed), abs=1e-6)
    with pytest.raises(UserError, match="already removed"):
        run(model_dir, text_files, tmp_path / "too-much", [{"method": "stun", "experts_to_keep": 1},
                                                           {**wanda, "sparsity": 0.3}])


def test_moefication_splits_the_mlp_exactly_and_routes_better_than_chance():
    """docs/moefication.py (the benchmark's MoE): with every expert active and equal routing weights the
    MoE computes the dense model; experts are disjoint equal channel sets; the router beats chance."""
    import importlib.util

    from tests.conftest import ROOT, tiny_llama

    spec = importlib.util.spec_from_file_location("moefication", ROOT / "docs" / "moefication.py")
    moefication = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(moefication)
    dense = tiny_llama()
    windows = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    moe, facts = moefication.moefy(dense, windows, experts=4, top_k=4, tokens=256, seed=0, log=lambda _: None)
    moefication.set_alpha(moe, 0.0)  # equal weights 1/4, and the down projections carry x4
    moe.eval()
    assert (logits(moe) - logits(dense)).abs().max() < 1e-4
    experts = moe.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 2 * 40, 96) and experts.down_proj.shape == (4, 96, 40)
    rows = experts.gate_up_proj[:, :40].reshape(-1, 96)  # every gate row of the dense MLP, once
    dense_rows = dense.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(torch.sort(rows.sum(1)).values, torch.sort(dense_rows.sum(1)).values)
    _, facts = moefication.moefy(dense, windows, experts=4, top_k=2, tokens=256, seed=0, log=lambda _: None)
    assert sum(f["router_top_k_recall"] for f in facts) / len(facts) > 0.5 + 0.1  # chance: 2 of 4
