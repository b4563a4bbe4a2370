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
