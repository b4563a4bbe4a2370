"""The command line end to end on a tiny model, and its answers to bad input."""

import json

from typer.testing import CliRunner

import compress
from cli import app

runner = CliRunner()


def _args(recipe: dict) -> list[str]:
    cal, ev = recipe["calibration"], recipe["eval"]
    return [
        "recipe=flap_20", f"model={recipe['model']['name']}", f"output={recipe['export']['output']}",
        f"calibration={cal['path']}", f"calibration.num_samples={cal['num_samples']}",
        f"calibration.seq_len={cal['seq_len']}", f"eval.text={ev['text']}", f"eval.seq_len={ev['seq_len']}",
        f"ppl={ev['ppl']}", "sparsity=0.3",
    ]


def test_run_writes_a_complete_checkpoint(tiny_recipe, tmp_path):
    result = runner.invoke(app, ["run", *_args(tiny_recipe), "--quiet"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "recipe.yaml",
            "report.json", "README.md"} <= names
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"]["achieved_decoder_linear"] - 0.3) < 0.04
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    assert report["ppl"]["dense"] > 0 and report["ppl"]["pruned"] > 0
    assert len(report["layers"]) == 3 and "prune" in report["seconds"] and report["peak_rss_mib"] > 0
    assert report["params"]["total_after"] < report["params"]["total_before"]
    assert "decoder-linear sparsity" in result.output
    model = compress.load(out)
    assert sum(p.numel() for p in model.parameters()) == report["params"]["total_after"]


def test_run_refuses_a_non_empty_output_then_overwrites(tiny_recipe, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("x")
    result = runner.invoke(app, ["run", *_args(tiny_recipe), "--quiet"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    # audit R5: --overwrite replaces a compress checkpoint, never a folder of something else
    result = runner.invoke(app, ["run", *_args(tiny_recipe), "--quiet", "--overwrite"])
    assert result.exit_code == 2 and "not one (no report.json" in result.output, result.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    (out / "precious.txt").unlink()
    assert runner.invoke(app, ["run", *_args(tiny_recipe), "--quiet"]).exit_code == 0
    first = (out / "report.json").read_text()
    result = runner.invoke(app, ["run", *_args(tiny_recipe), "--quiet", "--overwrite", "sparsity=0.2"])
    assert result.exit_code == 0 and (out / "report.json").read_text() != first
    assert not list(tmp_path.glob(".out.old-*")) and not list(tmp_path.glob(".out.partial-*"))


def test_debug_shows_the_traceback(tiny_recipe):
    result = runner.invoke(app, ["run", *_args(tiny_recipe), "sparsity=1.2", "--debug"])
    assert result.exit_code != 0 and result.exception is not None


def test_print_validate_ls_cp_eval(tiny_recipe, tmp_path):
    result = runner.invoke(app, ["print", "recipe=flap_20", "stages.0.sparsity=0.25"])
    assert result.exit_code == 0 and "sparsity: 0.25" in result.output
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0 and "flap_20" in result.output and "smollm2-135m" in result.output
    result = runner.invoke(app, ["cp", "flap_20", str(tmp_path / "mine.yaml")])
    assert result.exit_code == 0 and (tmp_path / "mine.yaml").read_text().startswith("# FLAP 20%")
    result = runner.invoke(app, ["validate", f"recipe={tmp_path / 'mine.yaml'}",
                                 f"model={tiny_recipe['model']['name']}",
                                 f"calibration={tiny_recipe['calibration']['path']}",
                                 f"eval.text={tiny_recipe['eval']['text']}",
                                 "calibration.seq_len=32", "eval.seq_len=32"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["eval", f"model={tiny_recipe['model']['name']}", f"text={tiny_recipe['eval']['text']}",
                                 "ppl=2", "seq_len=32", "--quiet"])
    assert result.exit_code == 0 and "ppl (2, 32 tokens, " in result.output


def test_python_api_takes_the_same_recipe(tiny_recipe, tmp_path):
    report = compress.run(tiny_recipe, progress=False, log=lambda _: None)
    assert (tmp_path / "out" / "report.json").exists()
    assert report["export"]["format"] in ("stock", "per_layer")


def test_self_calibration_runs_without_data(tiny_recipe, tmp_path):
    tiny_recipe["calibration"] = {"source": "self", "num_samples": 4, "seq_len": 16, "batch_size": 2}
    report = compress.run(tiny_recipe, progress=False, log=lambda _: None)
    assert report["sparsity"]["achieved_decoder_linear"] > 0.2


def test_eval_command_speaks_its_own_keys(tiny_recipe):
    model = f"model={tiny_recipe['model']['name']}"
    missing = runner.invoke(app, ["eval", model, "text=/no/such/test.txt"])
    assert missing.exit_code == 2 and "set text=FILE" in missing.output and "eval.text" not in missing.output
    wrong_key = runner.invoke(app, ["eval", model, "eval.text=/no/such/test.txt"])
    assert wrong_key.exit_code == 2 and "unknown eval key 'eval.text'" in wrong_key.output
    nothing = runner.invoke(app, ["eval", model, "ppl=none"])
    assert nothing.exit_code == 2 and "ppl=none alone leaves nothing to do" in nothing.output
    assert "Traceback" not in nothing.output and "internal error" not in nothing.output
    packaged = runner.invoke(app, ["eval", model, "ppl=1", "seq_len=32", "--quiet"])
    assert packaged.exit_code == 0 and "wikitext2 (packaged)" in packaged.output, packaged.output
