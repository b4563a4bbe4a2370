"""LoRA recovery stage on a tiny model: the loss goes down, masks survive merging, adapters export."""

import pytest
import torch

import compress
from compress.arch import get_adapter
from compress.methods.lora import LoraConfig, layer_ranks
from compress.ops.masks import follows_nm
from compress.ops.training import causal_lm_loss, lr_factor
from compress.recipe import load_recipe
from compress.runner import pipeline
from tests.conftest import tiny_model


def lora_stage(text_files, **overrides):
    stage = {"method": "lora", "steps": 30, "batch_size": 4, "seq_len": 32, "learning_rate": 3e-3, "warmup_steps": 3,
             "data": {"path": str(text_files["calibration"])}}
    stage.update(overrides)
    return stage


def run(tiny_recipe, stages):
    tiny_recipe["stages"] = stages
    return pipeline.run(load_recipe(tiny_recipe), progress=False, log=lambda _: None)


def test_recovery_lowers_the_loss_and_the_export_reloads(tiny_recipe, text_files):
    report = run(tiny_recipe, [{"method": "flap", "sparsity": 0.3}, lora_stage(text_files)])
    details = report["stages"][1]
    assert details["loss_last"] < details["loss_first"] - 0.1
    assert report["ppl"]["pruned"] < details["ppl_before"]  # the final eval is after recovery
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    assert report["params"]["decoder_linear_after"] < report["params"]["decoder_linear_before"]  # still pruned
    assert report["sparsity"]["targets"] == [0.3]  # recovery removes nothing
    model = compress.load(tiny_recipe["export"]["output"])
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_wanda_2_4_then_recovery_keeps_exactly_2_4(tiny_recipe, text_files, tmp_path):
    tiny_recipe["export"]["output"] = str(tmp_path / "plain")
    plain = compress.load(run(tiny_recipe, [{"method": "wanda", "pattern": "2:4"}])["export"]["output"])
    tiny_recipe["export"]["output"] = str(tmp_path / "recovered")
    report = run(tiny_recipe, [{"method": "wanda", "pattern": "2:4"}, lora_stage(text_files)])
    assert report["stages"][1]["patterns_verified"] == ["2:4"]
    assert report["export"]["nm_pattern_verified"] == ["2:4"]
    recovered = compress.load(report["export"]["output"])
    changed = 0
    for layer_a, layer_b in zip(get_adapter(plain).layers(), get_adapter(recovered).layers()):
        for (name, a), b in zip(get_adapter(plain).decoder_linears(layer_a).items(),
                                get_adapter(recovered).decoder_linears(layer_b).values()):
            assert follows_nm(b.weight, 2, 4), name
            assert torch.equal(a.weight == 0, b.weight == 0), name  # the same zeros, not just the same count
            changed += int(not torch.equal(a.weight, b.weight))
    assert changed == 3 * 7  # the fine-tune reached every linear


def test_unmerged_adapter_exports_and_reproduces_its_perplexity(tiny_recipe, text_files):
    from peft import PeftModel

    from calibration.data import tokenize_text
    from compress.model.evaluate import eval_windows, perplexity

    report = run(tiny_recipe, [{"method": "flap", "sparsity": 0.3}, lora_stage(text_files, merge=False)])
    details = report["stages"][1]
    output = tiny_recipe["export"]["output"]
    base = compress.load(output)
    tuned = PeftModel.from_pretrained(base, f"{output}/adapter").eval()
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(output)
    ids = tokenize_text(tokenizer, open(tiny_recipe["eval"]["text"]).read())
    windows = eval_windows(ids, tiny_recipe["eval"]["seq_len"], tiny_recipe["eval"]["ppl"])
    assert perplexity(tuned, windows) == pytest.approx(details["ppl_with_adapter"], rel=1e-4)
    assert report["ppl"]["pruned"] == pytest.approx(details["ppl_before"], rel=1e-6)  # exported weights untouched


def test_importance_ranks_follow_the_layer_importance_with_the_same_mean():
    config = LoraConfig(rank=8, rank_allocation="importance", min_rank=1, max_rank=64, importance_temperature=20)
    importance = [0.10, 0.30, 0.20, 0.25]
    ranks = layer_ranks(importance, config)
    assert ranks[1] > ranks[3] > ranks[2] > ranks[0]
    assert sum(ranks) / len(ranks) == pytest.approx(8, abs=0.5)
    inverse = layer_ranks(importance, LoraConfig(rank=8, rank_allocation="inverse", min_rank=1,
                                                 importance_temperature=20))
    assert inverse[0] > inverse[2] > inverse[3] > inverse[1]


def test_importance_guided_recovery_runs_with_per_layer_ranks(tiny_recipe, text_files):
    report = run(tiny_recipe, [{"method": "cfsp", "sparsity": 0.3},
                               lora_stage(text_files, rank_allocation="importance", importance_temperature=40)])
    cfsp, lora = report["stages"]
    assert len(lora["layer_ranks"]) == 3
    order = sorted(range(3), key=lambda i: cfsp["block_importance"][i])
    assert [lora["layer_ranks"][i] for i in order] == sorted(lora["layer_ranks"])


def test_learning_rate_warms_up_then_decays_to_zero():
    values = [lr_factor(step, 4, 20) for step in range(20)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)


def test_tokens_set_the_number_of_steps():
    assert LoraConfig(tokens=10_000, batch_size=4, seq_len=256).total_steps == 10
    assert LoraConfig(steps=7).total_steps == 7


def test_two_processes_train_data_parallel_like_one(tiny_recipe, text_files, tmp_path):
    """`torchrun --nproc_per_node 2` (what `accelerate launch` starts): each process takes half of every batch,
    gradients are averaged, only the main process writes; the result matches the one-process run."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    stage = lora_stage(text_files, steps=12, dropout=0.0)
    args = ["recipe=flap_20", f"model={tiny_recipe['model']['name']}", f"calibration={text_files['calibration']}",
            "calibration.num_samples=8", "calibration.seq_len=32", f"eval.text={text_files['test']}", "eval.seq_len=32",
            "ppl=2", f"stages=[{{method: flap, sparsity: 0.3}}, {json.dumps(stage)}]", "--quiet"]
    single = subprocess.run([sys.executable, str(root / "cli.py"), "run", *args, f"output={tmp_path / 'one'}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(root / "cli.py"), "run", *args, f"output={tmp_path / 'two'}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert double.returncode == 0, double.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["ppl"]["pruned"] == pytest.approx(one["ppl"]["pruned"], rel=1e-3)
    assert two["ppl"]["pruned"] < two["stages"][1]["ppl_before"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no work folders left


def test_instruction_records_are_formatted_by_the_template(tmp_path):
    from compress.errors import UserError
    from compress.methods.lora import RecoveryDataConfig, recovery_text

    data = tmp_path / "instructions.jsonl"
    data.write_text('{"instruction": "Add 2 and 3.", "output": "5"}\n\n{"instruction": "Say hi.", "output": "hi"}\n')
    config = RecoveryDataConfig(source="jsonl", path=str(data), template="Q: {instruction}\nA: {output}")
    assert recovery_text(config, "</s>") == "Q: Add 2 and 3.\nA: 5</s>Q: Say hi.\nA: hi"
    broken = RecoveryDataConfig(source="jsonl", path=str(data), template="{question}")
    with pytest.raises(UserError, match=r"instructions.jsonl:1 has no field 'question'"):
        recovery_text(broken, "</s>")


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3_moe"])
def test_the_chunked_training_loss_is_the_models_own_loss_and_gradients(model_type):
    """causal_lm_loss (logits 5 positions at a time, checkpointed) equals `labels=` loss and its LoRA gradients;
    Gemma's logit soft-capping included (a cap of 0.5 makes it matter)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = tiny_model(model_type)
    if model_type == "gemma3_text":
        model.config.final_logit_softcapping = 0.5
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                      init_lora_weights=False))
    batch = torch.randint(0, 320, (3, 17), generator=torch.Generator().manual_seed(0))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    reference = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
    expected = torch.autograd.grad(reference, trainable)
    loss = causal_lm_loss(peft_model, peft_model, batch, chunk=5)
    got = torch.autograd.grad(loss, trainable)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
