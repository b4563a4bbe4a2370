"""No code runs from data: safetensors only, no pickles, no remote code, tokens never written."""

import ast
import json
import re
from pathlib import Path

from typer.testing import CliRunner

import compress
from cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_a_hub_token_never_reaches_output_or_files(tiny_recipe, tmp_path, monkeypatch, capsys):
    secret = "hf_SECRETsecretSECRET0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    compress.run(tiny_recipe, progress=False)
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    for path in (tmp_path / "out").rglob("*"):
        assert secret.encode() not in path.read_bytes(), path.name


def test_remote_code_in_a_model_folder_is_never_imported(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}}))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "model.safetensors").write_bytes(b"")
    for flag in ("false", "true"):
        result = CliRunner().invoke(app, ["validate", "recipe=flap_20", f"model={folder}",
                                          f"model.trust_remote_code={flag}"])
        assert result.exit_code == 2 and "unsupported architecture 'evil'" in result.output
    assert not marker.exists()


def test_the_library_never_unpickles():
    sources = [p for folder in ("compress", "calibration") for p in (ROOT / folder).rglob("*.py")] + [ROOT / "cli.py"]
    for path in sources:
        text = path.read_text()
        assert not re.search(r"^\s*import pickle|^\s*from pickle", text, re.M), path
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in call.group(1), f"{path}: {call.group(0)}"
        for node in ast.walk(ast.parse(text)):  # no call turns remote code on by itself
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code":
                        assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True), path


def _per_layer_folder(folder: Path, base: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "per_layer_config": {"0": {"intermediate_size": 8}}, "compress_base": base,
        "auto_map": {"AutoModelForCausalLM": "modeling_pruned.PrunedForCausalLM"}}))
    (folder / "model.safetensors").write_bytes(b"")


def test_compress_load_imports_only_the_stock_classes_of_supported_architectures(tmp_path):
    """Audit D7: a poisoned compress_base naming a module beside the checkpoint is refused, never imported
    (run from inside the folder, where the current folder is on sys.path)."""
    import subprocess
    import sys

    folder = tmp_path / "poisoned"
    marker = tmp_path / "PWNED"
    _per_layer_folder(folder, {"module": "evilmod", "model_class": "X", "config_class": "Y"})
    (folder / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "modeling_pruned.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    script = ("import compress\ntry:\n    compress.load('.')\n"
              "except Exception as err:\n    print(type(err).__name__, err)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert "UserError" in result.stdout and "refusing to import it" in result.stdout, result.stdout + result.stderr
    assert not marker.exists()


def test_a_llama_folder_with_a_booby_trapped_modelling_file_runs_no_code(tiny_model_dir, tmp_path, text_files):
    """Audit R4: a known model type with an auto_map and a modelling file beside it: compress run and
    compress.load use the stock classes; the file is never imported."""
    import shutil

    folder = tmp_path / "trapped"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "PWNED"
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_trap.Trap", "AutoConfig": "modeling_trap.TrapConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_trap.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    recipe = {"model": {"name": str(folder)}, "stages": [{"method": "flap", "sparsity": 0.3}],
              "calibration": {"path": str(text_files["calibration"]), "num_samples": 4, "seq_len": 32},
              "export": {"output": str(tmp_path / "out")}, "eval": {"ppl": "none"}}
    compress.run(recipe, progress=False, log=lambda _: None)
    compress.load(folder)
    assert not marker.exists()


def test_preflight_reads_the_pinned_hub_revision(monkeypatch):
    """Audit D6: the config check of a Hub model reads the revision the load will use (and, with remote
    code on, never runs the main branch's configuration code)."""
    import transformers

    from compress.recipe import ModelConfig
    from compress.recipe.preflight import check_model

    seen = {}

    class Config:
        def to_dict(self):
            return {"model_type": "llama"}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return Config()

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    check_model(ModelConfig(name="someone/model", revision="0123abc", trust_remote_code=True))
    assert seen == {"name": "someone/model", "revision": "0123abc", "trust_remote_code": True}


def test_a_hub_model_reads_the_token_only_through_the_hub_client(monkeypatch, tmp_path, capsys):
    """Audit R4: the token in HF_TOKEN reaches the Hub client and nothing we print or write."""
    import huggingface_hub

    from compress.model.loading import read_config

    secret = "hf_SECRETsecretSECRET0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    asked = []

    def fake_download(*args, **kwargs):
        asked.append(huggingface_hub.utils.get_token())
        raise huggingface_hub.errors.EntryNotFoundError("no such file (mocked hub)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr("transformers.utils.hub.hf_hub_download", fake_download, raising=False)
    try:
        read_config("someone/model", "hub")
    except Exception as err:  # the mocked hub has no file: a UserError naming the model
        message = str(err)
    else:
        message = ""
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err + message
    assert asked and asked[0] == secret  # the client itself did read it
