"""Where exports go next: `compress push` against a recording stand-in for the Hub client (no network), the
model card's metadata and measured rows, the per-layer plot of every export, and the perplexity gate
`compress eval baseline=... max_ratio=...` that users' CI runs."""

import json
import shutil

import pytest
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import compress
from cli import app
from compress.errors import UserError
from compress.export.hub import push

runner = CliRunner()
SECRET = "hf_thisIsNotARealTokenButMustNeverBePrinted"


class RecordingApi:
    """Records what push asks of the Hub, the way HfApi would be called."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))

        class Info:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"
        return Info()


@pytest.fixture(scope="module")
def export(tiny_model_dir, text_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("exports") / "flap"
    recipe = {"model": {"name": str(tiny_model_dir)},
              "calibration": {"source": "text", "path": str(text_files["calibration"]), "num_samples": 8,
                              "seq_len": 32},
              "stages": [{"method": "flap", "sparsity": 0.3}], "export": {"output": str(output)},
              "eval": {"ppl": 2, "text": str(text_files["test"]), "seq_len": 32}}
    compress.run(recipe, progress=False, log=lambda _: None)
    return output


def test_push_uploads_every_file_in_one_private_commit_with_the_repo_in_the_card(export, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    api = RecordingApi()
    url = push(export, "me/tiny-flap", api=api)
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    repo = api.calls[0][1]
    assert repo["private"] is True and repo["exist_ok"] is True and repo["repo_id"] == "me/tiny-flap"
    commit = api.calls[1][1]
    uploaded = {op.path_in_repo: op for op in commit["operations"]}
    assert set(uploaded) == {p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()}
    card = uploaded["README.md"].path_or_fileobj
    card = card.decode() if isinstance(card, bytes) else card.getvalue().decode()
    assert 'from_pretrained("me/tiny-flap", trust_remote_code=True)' in card
    assert 'AutoTokenizer.from_pretrained("me/tiny-flap")' in card and '"PATH"' not in card
    assert "flap" in commit["commit_message"] and commit["revision"] is None and url.endswith("/commit/abc")
    output = capsys.readouterr()
    assert SECRET not in output.out + output.err and "(private)" in output.out
    assert not any(SECRET in p.read_text(errors="replace") for p in export.rglob("*") if p.is_file())


def test_push_public_to_a_branch(export):
    api = RecordingApi()
    push(export, "me/tiny-flap", public=True, revision="v2", message="second try", api=api, log=lambda _: None)
    assert api.calls[0][1]["private"] is False
    assert api.calls[1] == ("create_branch", {"repo_id": "me/tiny-flap", "branch": "v2", "exist_ok": True,
                                              "repo_type": "model"})
    assert api.calls[2][1]["revision"] == "v2" and api.calls[2][1]["commit_message"] == "second try"


def test_push_refuses_what_is_not_a_verified_export(export, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="not a compress export"):
        push(tmp_path, "me/x", api=RecordingApi())
    unverified = tmp_path / "unverified"
    shutil.copytree(export, unverified)
    report = json.loads((unverified / "report.json").read_text())
    report["export"]["reload_max_abs_logit_diff"] = None
    (unverified / "report.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match="without the reload check"):
        push(unverified, "me/x", api=RecordingApi())
    report["export"]["reload_max_abs_logit_diff"] = 0.5
    (unverified / "report.json").write_text(json.dumps(report))
    with pytest.raises(UserError, match="failed its reload check"):
        push(unverified, "me/x", api=RecordingApi())
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    result = runner.invoke(app, ["push", str(export), "me/x"])
    assert result.exit_code == 2 and "no Hugging Face token" in result.output


def test_the_card_has_the_hub_header_measured_rows_recipe_and_plots(export):
    card = (export / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert {"pruned", "compress", "flap"} <= set(header["tags"])
    report = json.loads((export / "report.json").read_text())
    assert f"| {report['ppl']['dense']:.2f} | {report['ppl']['pruned']:.2f} |" in card
    assert f"{report['params']['total_after']:,}" in card and "![per-layer share removed](layers.png)" in card
    assert "method: flap" in card.split("## Recipe")[1]
    assert (export / "layers.png").read_bytes()[:4] == b"\x89PNG"
    row = report["layers"][0]
    assert 0 <= row["attention_removed"] <= 1 and 0 <= row["mlp_removed"] <= 1 and row["zero_fraction"] == 0
    assert any(r["mlp_removed"] > 0 for r in report["layers"])


def test_builtin_models_name_their_hub_original_and_license():
    from compress.export.card import base_model_facts

    assert base_model_facts("smollm2-135m") == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                "license": "apache-2.0"}
    assert base_model_facts("org/model") == {"base_model": "org/model"}


def test_the_gate_passes_the_same_checkpoint_and_fails_a_worse_one(export, tiny_model_dir, text_files, tmp_path):
    measure = ["eval", f"text={text_files['test']}", "seq_len=32", "ppl=2", "--quiet"]
    gate = [f"baseline={export / 'report.json'}", "max_ratio=1.02"]
    same = runner.invoke(app, [*measure, f"model={export}", *gate])
    assert same.exit_code == 0 and "ok: ppl" in same.output, same.output
    worse = tmp_path / "worse"  # the same checkpoint with its embedding scaled: sharp, wrong predictions
    shutil.copytree(export, worse)
    weights = load_file(worse / "model.safetensors")
    weights = {name: tensor * 20 if "embed_tokens" in name else tensor for name, tensor in weights.items()}
    save_file(weights, worse / "model.safetensors", metadata={"format": "pt"})
    regressed = runner.invoke(app, [*measure, f"model={worse}", *gate])
    assert regressed.exit_code == 1 and "regressed: ppl" in regressed.output, regressed.output
    assert "max_ratio 1.02" in regressed.output
    mismatch = runner.invoke(app, [*measure[:-2], "ppl=1", "--quiet", f"model={export}", f"baseline={export}"])
    assert mismatch.exit_code == 2 and "pass ppl=2" in mismatch.output, mismatch.output
