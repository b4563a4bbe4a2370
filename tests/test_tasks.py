"""Zero-shot accuracy through lm-eval-harness (`eval.tasks`): a local multiple-choice task (tests/data, no
Hub), dense and pruned side by side in the report, each checked against the accuracy computed here by
scoring every choice's log-likelihood with the model directly."""

import json

import pytest
import torch

import compress
from compress.errors import UserError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    template = (ROOT / "tests" / "data" / "tiny_mc.yaml").read_text()
    (folder / "tiny_mc.yaml").write_text(template.replace("DATA_FILE", str(ROOT / "tests" / "data" / "tiny_mc.jsonl")))
    return folder


def direct_accuracy(model, tokenizer) -> tuple[float, float]:
    """lm-eval's `acc` and `acc_norm` computed here: a question is right when its answer has the highest summed
    log-likelihood after the question (context, then " " + choice; the choice's tokens are what the whole adds),
    or the highest per character of the choice for acc_norm."""
    docs = [json.loads(line) for line in (ROOT / "tests" / "data" / "tiny_mc.jsonl").read_text().splitlines()]
    right = right_norm = 0
    for doc in docs:
        context = tokenizer(doc["question"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        per_char = [score / len(choice) for score, choice in zip(scores, doc["choices"])]
        right_norm += max(range(len(per_char)), key=per_char.__getitem__) == doc["answer"]
    return right / len(docs), right_norm / len(docs)


def test_accuracy_dense_and_pruned_in_the_report(tiny_model_dir, text_files, task_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "out"
    recipe = {"model": {"name": str(tiny_model_dir)},
              "calibration": {"source": "text", "path": str(text_files["calibration"]), "num_samples": 8,
                              "seq_len": 32},
              "stages": [{"method": "flap", "sparsity": 0.5, "uniform": True, "compensation": "none", "round_to": 8}],
              "export": {"output": str(output)},
              "eval": {"ppl": "none", "tasks": ["compress_tiny_mc"], "task_paths": [str(task_dir)]}}
    report = compress.run(recipe, progress=False, log=lambda _: None)
    tasks = report["tasks"]
    assert tasks["names"] == ["compress_tiny_mc"] and tasks["num_fewshot"] == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    dense = direct_accuracy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer)
    pruned = direct_accuracy(compress.load(output), tokenizer)
    for label, (acc, acc_norm) in (("dense", dense), ("pruned", pruned)):
        scores = tasks[label]["compress_tiny_mc"]
        assert (scores["acc"], scores["acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm)), label
        assert "acc_stderr" in scores
    card = (output / "README.md").read_text()
    assert "compress_tiny_mc" in card


def test_an_unknown_task_is_refused_before_loading(tiny_model_dir, task_dir, tmp_path):
    recipe = {"model": {"name": str(tiny_model_dir)}, "stages": [{"method": "flap", "sparsity": 0.2}],
              "export": {"output": str(tmp_path / "out")},
              "eval": {"ppl": "none", "tasks": ["compress_tiny_mcq"], "task_paths": [str(task_dir)]}}
    with pytest.raises(UserError, match="no task 'compress_tiny_mcq'.*compress_tiny_mc"):
        compress.run(recipe, progress=False, log=lambda _: None)
    recipe["eval"]["task_paths"] = [str(tmp_path / "missing")]
    with pytest.raises(UserError, match="does not exist"):
        compress.run(recipe, progress=False, log=lambda _: None)


def test_compress_eval_reports_task_accuracy(tiny_model_dir, task_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["eval", f"model={tiny_model_dir}", "ppl=none", "tasks=compress_tiny_mc",
                                      f"task_paths={task_dir}", "--quiet"])
    assert result.exit_code == 0, result.output
    expected = direct_accuracy(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               AutoTokenizer.from_pretrained(tiny_model_dir))
    assert f"compress_tiny_mc (0-shot): acc {expected[0]:.4f}, acc_norm {expected[1]:.4f}" in result.output
