"""Catalogue of bad inputs: each fails before any weight is loaded, with exit code 2, one line that
names the problem and the fix, no traceback, and nothing written.

`python -m tests.test_catalogue` rewrites docs/errors.md (input -> message) by running every case; a
test checks the file is what the cases print, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app

runner = CliRunner()
Case = namedtuple("Case", "problem args message")

CASES = [
    # recipe syntax, keys, types, values
    Case("recipe file is not valid YAML", ["recipe={BADYAML}"], "is not valid YAML"),
    Case("recipe file is a list, not a mapping", ["recipe={LISTYAML}"], "must be a YAML mapping"),
    Case("recipe names a Python object", ["recipe={PYYAML}"], "is not valid YAML"),
    Case("unknown packaged recipe", ["recipe=flap_2O"], "did you mean 'flap_20'"),
    Case("misspelt stage key", ["stages.0.sparsty=0.3"], "did you mean 'stages.0.sparsity'"),
    Case("misspelt section key", ["model.nmae=x"], "did you mean 'model.name'"),
    Case("unknown top-level key", ["colour=red"], "unknown recipe key 'colour'"),
    Case("argument without '='", ["notakeyvalue"], "not key=value"),
    Case("argument without key", ["=3"], "no key before '='"),
    Case("list index out of range", ["stages.4.sparsity=0.2"], "index 4 out of range"),
    Case("sparsity= with two stages", ["stages=[{method: flap}, {method: wanda}]", "sparsity=0.3"],
         "sparsity= is ambiguous with 2 stages"),
    Case("wrong type", ["calibration.num_samples=many"], "valid integer"),
    Case("sparsity 1 or more", ["sparsity=1.2"], "less than 1"),
    Case("negative sparsity", ["sparsity=-0.1"], "greater than or equal to 0"),
    Case("no calibration samples", ["calibration.num_samples=0"], "greater than or equal to 1"),
    Case("unknown dtype", ["dtype=float8"], "'float32', 'bfloat16' or 'float16'"),
    Case("zero threads", ["threads=0"], "greater than or equal to 1"),
    Case("round_to 0", ["stages.0.round_to=0"], "greater than or equal to 1"),
    # methods and stage order
    Case("unknown method", ["stages.0.method=flapp"], "did you mean 'flap'"),
    Case("stage without a method", ["stages=[{sparsity: 0.2}]"], "has no 'method'"),
    Case("no stages", ["stages=[]"], "at least 1 item"),
    Case("2:4 with a sparsity other than 0.5", ["stages=[{method: wanda, sparsity: 0.6, pattern: '2:4'}]"],
         "set sparsity=0.5"),
    Case("N:M with N >= M", ["stages=[{method: wanda, sparsity: 0, pattern: '4:4'}]"], "0 < N < M"),
    Case("malformed pattern", ["stages=[{method: wanda, pattern: 'half'}]"], "neither 'unstructured' nor 'N:M'"),
    Case("M does not divide an input width", ["stages=[{method: wanda, sparsity: 0.6666666666666667, pattern: '1:3'}]"],
         "intermediate_size 160 is not a multiple of M=3"),
    Case("OWL with an N:M pattern", ["stages=[{method: gblm, pattern: '2:4', owl: true}]"],
         "use pattern=unstructured with owl"),
    Case("N:M after a structured stage with free widths",
         ["stages=[{method: flap, sparsity: 0.2}, {method: wanda, pattern: '2:4'}]"], "set stages.0.round_to=8"),
    Case("structured stage after an N:M stage",
         ["stages=[{method: wanda, pattern: '2:4'}, {method: flap, sparsity: 0.2}]"], "put structured stages first"),
    # model
    Case("model folder missing", ["model=/no/such/folder"], "model not found"),
    Case("model folder without config.json", ["model={NOCONFIG}"], "has no config.json"),
    Case("pickled weights only", ["model={PICKLED}"], "pickled weights are never loaded"),
    Case("unsupported architecture", ["model={GPT2}"], "unsupported architecture 'gpt2'"),
    Case("calibration longer than the model's context", ["calibration.seq_len=4096"],
         "longer than the model's context"),
    # data
    Case("calibration file missing", ["calibration=/no/such/file.txt"], "calibration file not found"),
    Case("calibration file empty (gradient method)", ["stages=[{method: gblm}]", "calibration={EMPTY}"], "is empty"),
    Case("calibration file not UTF-8", ["calibration={BADUTF8}"], "give a UTF-8 text file"),
    Case("jsonl line is not JSON", ["calibration=jsonl", "calibration.path={BADJSONL}"], "is not valid JSON"),
    Case("jsonl without the field", ["calibration=jsonl", "calibration.path={JSONL}", "calibration.field=body"],
         "has no field 'body'"),
    Case("Hugging Face source without a dataset", ["calibration=hf"], "needs calibration.dataset"),
    Case("calibration on the evaluation text", ["calibration={EVAL}"], "fitting weights on the test text"),
    Case("unknown named data set", ["calibration.name=wikitext103"], "unknown data set 'wikitext103'"),
    Case("file and named set at once", ["calibration.path={JSONL}", "calibration.source=builtin"],
         "set source=text (or jsonl)"),
    Case("evaluation text missing", ["eval.text=/no/such/test.txt"], "evaluation text not found"),
    Case("CFSP on MLPs only beyond what the MLPs hold", ["stages=[{method: cfsp, sparsity: 0.8, targets: mlp}]"],
         "use stages.0.targets=both"),
    Case("Týr holding out every calibration window", ["stages=[{method: tyr, fitness_windows: 4096}]"],
         "leaves no calibration window to build on"),
    # recovery
    Case("recovery trains on the evaluation text", ["stages=[{method: flap}, {method: lora, data: {path: '{EVAL}'}}]"],
         "fitting weights on the test text"),
    Case("recovery data file missing", ["stages=[{method: flap}, {method: lora, data: {path: /no/such.txt}}]"],
         "recovery data file not found"),
    Case("LoRA on a module that is not a decoder linear",
         ["stages=[{method: flap}, {method: lora, target_modules: [lm_head]}]"], "unknown target module 'lm_head'"),
    Case("instruction template on plain text", ["stages=[{method: flap}, {method: lora, data: {template: '{x}'}}]"],
         "set data.source=jsonl or hf"),
    Case("GBLM on an offloaded model", ["stages=[{method: gblm}]", "model.max_memory={cpu: 1GiB}"],
         "drop model.max_memory/model.device_map"),
    # output
    Case("no output folder", ["output="], "no output folder"),
    Case("output folder not empty", ["output={NONEMPTY}"], "is not empty"),
    Case("output is a file", ["output={AFILE}"], "exists and is a file"),
    Case("disk too small for the export", ["{LOWDISK}"], "not enough disk space"),
]


def materialize(tmp: Path, tiny_model_dir: Path) -> dict[str, str]:
    """The files the cases refer to, created under `tmp`."""
    files = {}

    def folder(name, config=None, weights=None):
        path = tmp / name
        path.mkdir()
        if config is not None:
            (path / "config.json").write_text(json.dumps(config))
        if weights == "safetensors":
            shutil.copy(tiny_model_dir / "model.safetensors", path / "model.safetensors")
        elif weights == "pickle":
            torch.save({"x": torch.zeros(1)}, path / "pytorch_model.bin")
        return str(path)

    files["NOCONFIG"] = folder("noconfig", None, "safetensors")
    files["PICKLED"] = folder("pickled", {"model_type": "llama"}, "pickle")
    files["GPT2"] = folder("gpt2", {"model_type": "gpt2"}, "safetensors")
    for name, content in {"BADYAML": b"stages: [\n  - method: flap\n  sparsity: :\n", "LISTYAML": b"- a\n- b\n",
                          "PYYAML": b"stages: !!python/object/apply:os.system ['touch PWNED']\n",
                          "EMPTY": b"", "BADUTF8": b"\xff\xfe\xfa not text",
                          "BADJSONL": b'{"text": "ok"}\n{"text": broken\n', "JSONL": b'{"text": "hello"}\n',
                          "AFILE": b"x"}.items():
        path = tmp / f"{name.lower()}.data"
        path.write_bytes(content)
        files[name] = str(path)
    nonempty = tmp / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("precious")
    files["NONEMPTY"] = str(nonempty)
    files["LOWDISK"] = ""
    return files


def base_args(tiny_model_dir: Path, text: Path, output: Path) -> list[str]:
    return ["recipe=flap_20", f"model={tiny_model_dir}", f"output={output}", f"calibration={text}",
            "calibration.num_samples=8", "calibration.seq_len=32", f"eval.text={eval_text(text)}", "eval.seq_len=32",
            "ppl=2"]


def eval_text(text: Path) -> Path:
    """The evaluation text beside the calibration text (the reversed corpus: a different text)."""
    path = text.with_name("eval.txt")
    if not path.is_file():
        path.write_text(text.read_text()[::-1])
    return path


def run_case(case: Case, tmp: Path, files: dict, tiny_model_dir: Path, text: Path, monkeypatch) -> tuple[int, str]:
    args = []
    for arg in case.args:
        arg = arg.replace("{TEXT}", str(text)).replace("{EVAL}", str(eval_text(text)))
        for name, value in files.items():
            arg = arg.replace(f"{{{name}}}", value)
        args.append(arg)
    if "{LOWDISK}" in case.args:
        usage = shutil.disk_usage(tmp)
        monkeypatch.setattr("shutil.disk_usage",
                            lambda _path: usage._replace(free=1000))
    args = [a for a in args if a]
    result = runner.invoke(app, ["run", *base_args(tiny_model_dir, text, tmp / "out"), *args, "--quiet"])
    return result.exit_code, result.output


@pytest.mark.parametrize("case", CASES, ids=[c.problem for c in CASES])
def test_bad_input_fails_first_with_one_clear_line(case, tmp_path, tiny_model_dir, text_files, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    files = materialize(work, tiny_model_dir)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    code, output = run_case(case, work, files, tiny_model_dir, text_files["calibration"], monkeypatch)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and case.message in lines[0], output
    assert "Traceback" not in output
    assert not (work / "out").exists()
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written meanwhile


ERRORS_MD = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
HEADER = """# What `compress run` says when the input is wrong

Every problem below is caught **before any weight is loaded**: the command exits with code 2,
prints one line naming the problem and the fix (no traceback unless `--debug`), and writes
nothing. Each row is a case of `tests/test_catalogue.py`, run on a tiny model with a valid recipe
plus the arguments shown; the messages are what that run printed (paths shortened to `…`).
Regenerate this file with `python -m tests.test_catalogue`; a test compares it
byte for byte.

| problem | arguments (added to a valid `compress run`) | message |
|---|---|---|
"""


class _Patch:
    """monkeypatch.setattr for a run outside pytest."""

    def __init__(self):
        self.undo = []

    def setattr(self, target, value):
        import importlib

        module, _, name = target.rpartition(".")
        obj = importlib.import_module(module)
        self.undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def restore(self):
        for obj, name, value in reversed(self.undo):
            setattr(obj, name, value)


def render_catalogue() -> str:
    """docs/errors.md, made by running every case on a fresh tiny model."""
    import tempfile

    from tests.conftest import CORPUS, tiny_llama, tiny_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        model_dir = root / "tiny"
        tiny_llama().save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        text = root / "calibration.txt"
        text.write_text(CORPUS)
        for number, case in enumerate(CASES):
            work = root / f"case{number}"
            work.mkdir()
            patch = _Patch()
            try:
                code, output = run_case(case, work, materialize(work, model_dir), model_dir, text, patch)
            finally:
                patch.restore()
            message = (output.strip().replace(str(work), "…").replace(str(model_dir), "MODEL")
                       .replace(str(root), "…").replace("|", "\\|"))
            shown = " ".join(f"`{a}`" for a in case.args).replace("|", "\\|")
            rows.append(f"| {case.problem} | {shown} | {message} (exit {code}) |\n")
    return HEADER + "".join(rows)


def test_catalogue_is_large_and_documented_byte_for_byte():
    assert len(CASES) >= 30
    assert render_catalogue() == ERRORS_MD.read_text(), "docs/errors.md is stale: run python -m tests.test_catalogue"


if __name__ == "__main__":  # python -m tests.test_catalogue: rewrite docs/errors.md from real runs
    ERRORS_MD.write_text(render_catalogue())
    print(f"wrote {ERRORS_MD}")
