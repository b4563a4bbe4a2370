"""Golden digests: every recipe shape, run on tiny in-process models, writes exactly the pinned bytes.

A safety net for behaviour-preserving refactors. Each shape below runs `compress.run` end to end on a
tiny random model (tests.conftest) with a short calibration on CORPUS and a 2-window perplexity on
CORPUS[::-1], then hashes with SHA-256:

- every `*.safetensors` file in the output folder (and `adapter/adapter_model.safetensors` when a LoRA
  stage keeps its adapter unmerged);
- `report.json`, cleaned of what changes from run to run or machine to machine (the VOLATILE_KEYS
  below: wall-clock times, memory peaks, package versions) and with the temporary folder replaced by
  "<TMP>" wherever a string holds it, serialised with `json.dumps(report, sort_keys=True)`. Perplexities
  and every other float stay in: they are deterministic on one machine (tests/test_determinism.py).

The pinned GOLDEN digests were computed on the machine that runs this suite (CPU, at most 2 threads, as
tests/conftest.py sets). Float results can differ with another torch build, CPU or thread count.

Regenerate the constants (prints the dict literal to paste over GOLDEN below):

    python -m tests.test_golden                  # every shape; or name shapes: ... flap moe-flap

A refactor must leave every digest unchanged. A deliberate change of output (a fix, a new report
field, a new default) must update GOLDEN in the same commit, and the commit message must say why the
bytes changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import CORPUS, tiny_model, tiny_tokenizer
from tests.test_offload import FORCE_DISK

# Keys removed wherever they occur in report.json: wall-clock times and throughputs (the pipeline's
# per-phase `seconds`, the LoRA stage's `train_seconds` / `tokens_per_second`), memory peaks, versions.
VOLATILE_KEYS = frozenset({"seconds", "peak_rss_mib", "peak_rss_mib_by_phase", "versions", "compress_version",
                           "train_seconds", "tokens_per_second", "build_seconds", "search_seconds"})
TMP = "<TMP>"

LORA = {"method": "lora", "steps": 2, "batch_size": 2, "seq_len": 16}  # + data: the calibration file

# shape name -> (model type of tests.conftest.tiny_model, stages, extra model options)
SHAPES: dict[str, tuple[str, list[dict], dict]] = {
    "flap": ("llama", [{"method": "flap", "sparsity": 0.3}], {}),
    "flap-uniform": ("llama", [{"method": "flap", "sparsity": 0.3, "uniform": True}], {}),
    "wanda_sp": ("llama", [{"method": "wanda_sp", "sparsity": 0.3}], {}),
    "cfsp": ("llama", [{"method": "cfsp", "sparsity": 0.3}], {}),
    "wanda-50": ("llama", [{"method": "wanda", "sparsity": 0.5}], {}),
    "wanda-2:4": ("llama", [{"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}], {}),
    "magnitude-2:4": ("llama", [{"method": "magnitude", "sparsity": 0.5, "pattern": "2:4"}], {}),
    "gblm-2:4": ("llama", [{"method": "gblm", "sparsity": 0.5, "pattern": "2:4", "cache_gradients": False}], {}),
    "flap+wanda-2:4": ("llama", [{"method": "flap", "sparsity": 0.3, "round_to": 8},
                                 {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"}], {}),
    "flap+lora": ("llama", [{"method": "flap", "sparsity": 0.3}, LORA], {}),
    "tyr": ("llama", [{"method": "tyr", "sparsity": 0.3, "rounds": 2, "generations": 2, "offspring": 4,
                       "fitness_windows": 2, "stage_windows": [1, 2], "kl_top": 32}], {}),
    "flap+lora-unmerged": ("llama", [{"method": "flap", "sparsity": 0.3}, {**LORA, "merge": False}], {}),
    "moe-flap": ("mixtral", [{"method": "flap", "sparsity": 0.3}], {}),
    "moe-wanda": ("qwen3_moe", [{"method": "wanda", "sparsity": 0.5}], {}),
    "sparsegpt-50": ("llama", [{"method": "sparsegpt", "sparsity": 0.5}], {}),
    "sparsegpt-2:4": ("llama", [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}], {}),
    "moe-sparsegpt-2:4": ("qwen3_moe", [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}], {}),
    "offload-flap": ("llama", [{"method": "flap", "sparsity": 0.3}], {"max_memory": FORCE_DISK}),
}

GOLDEN: dict[str, dict[str, str]] = {
    "flap": {
        "model.safetensors": "fab4c9f899002ccbd8a0f7300eaf43e97db886b349eff7623a9cfd746b2fc954",
        "report.json": "1c31866b6113e76dd884b88843f1859cb20e0acfdd2907279667600ebb7f6c5b",
    },
    "flap-uniform": {
        "model.safetensors": "60653ded31ac9ce41a022db28aec4b18489b450cd68a21ac417d92fc456bdf7b",
        "report.json": "70e4937de8a5157f9ea07f11ce12f77b5b7944a35ea13fb6c3f523dfd363e9e1",
    },
    "wanda_sp": {
        "model.safetensors": "f1f854e5067730d0e5d3049c0ed35fae36f51dc0105eee2f063eab281d1f356f",
        "report.json": "ae9ed3ccb333ba5e013ab2216712c673d413169a8295b35811406ebbc0b36666",
    },
    "cfsp": {
        "model.safetensors": "ffe6b7051102a867fdc22f04aea6fd27dd04ddc931000eba4f3ba412d1815105",
        "report.json": "c8b50e7021eb5b01bf4ee52a661a0106b913fa9e5aadf57c33cc7b773aed8223",
    },
    "wanda-50": {
        "model.safetensors": "0b6f0a0a427172b9689c6fe3414541b0749c5bd5efcfc8c30c8ac117cfa564bf",
        "report.json": "6eb698eeafeed9b0a4c10eeb3ef1974cbf89053672f78237f8538ef91766785f",
    },
    "wanda-2:4": {
        "model.safetensors": "e05a9b126d01d554b32dae9ecb9dc7f3b9fa964ecb57652f9a45a3287dc30801",
        "report.json": "8ee703df1bd18087e83df5cc4deb86318dc94fde2aa2975305f79807d30a55e4",
    },
    "magnitude-2:4": {
        "model.safetensors": "86af6c29ce35c9fdbc329463c6a27e8773774933139f7d012cecbb5e54092298",
        "report.json": "9db3525148fa4aa414c3c167b0699b1e47300396bea3d2a5e0fa4481ddffa68f",
    },
    "gblm-2:4": {
        "model.safetensors": "db25bbbe16d260beb8629b6e9b356f662472ab763605511b802d7720b8520c4f",
        "report.json": "3cb1d7820c48e835400bcf0d8d50fcc42f515cfec98e95e8f418e809eeb04ed3",
    },
    "flap+wanda-2:4": {
        "model.safetensors": "bb4fc695bd2d333a2033a1d95ac993d53051de80ff5793121e2dbc0d56068b00",
        "report.json": "233dc506c6a01fdc62047cc0ac793ddd4ec0c3bc54fd478bbd7e8a0e84dabece",
    },
    "flap+lora": {
        "model.safetensors": "d6e3f76805547f6529662b8a3eba984fbfa8b19a7791d1cd04a07d9e7842e99e",
        "report.json": "3ef82a949a3d92522af107999fedb3d0f46c23831227afb0afa8eeb800992c35",
    },
    "tyr": {
        "model.safetensors": "2014e86c17d2ce4eac926a6069f0ab2d6cc44c322432d6fb866373bacc0556e4",
        "report.json": "d0419119ce1cafa823b7bc2a14fb7d2f4b37d3a15701f81f68e9a68646e17845",
    },
    "flap+lora-unmerged": {
        "model.safetensors": "fab4c9f899002ccbd8a0f7300eaf43e97db886b349eff7623a9cfd746b2fc954",
        "adapter/adapter_model.safetensors": "82ed5bafd850999a5c385d3270380042061794c6e1b1a37a457532d5ca284dd9",
        "report.json": "8e332bf3f63e44d6b64351ab6a8b3b91b542a71dd2985e16288fb427d1c9a070",
    },
    "moe-flap": {
        "model.safetensors": "a0c6bd5be30fb3d6d74d4001a380b91dea02f80b8dc2bcc34a311adf70893034",
        "report.json": "41cc93cbbc50ddd7606305cfaf371450ec91860625d0b586d3aa83dbd5ee99b5",
    },
    "moe-wanda": {
        "model.safetensors": "f7b9482bd726f325c60a5361120eb4c41e1bf8ebbb401bed84cf0baed4387d87",
        "report.json": "239525bd57103d35470bd65d153a1eac6718eda05adfc2ba4e02ca0e19674f2b",
    },
    "sparsegpt-50": {
        "model.safetensors": "1db98b29c038dc2df579b0cf0f95d67a66af5247aec548f4c81a22eb03002850",
        "report.json": "846df09e38f182f0e8c0aff5c8c299e79851464d99044baaa7748c1ed923e5a7",
    },
    "sparsegpt-2:4": {
        "model.safetensors": "e789ee5ed61d898d5ab146d97aec5877406c19ea6e8bab146534a170ced2bda3",
        "report.json": "d0c334d6d9fea4d740aa6a1b8532fa254e31b8b9848ff0dc8d580561aa11a511",
    },
    "moe-sparsegpt-2:4": {
        "model.safetensors": "c9128e985e83dbad9904a82ac183d04e8738618c48dade1cc3f9c5927876c8cd",
        "report.json": "d58120cdc899df8c6eab14fa9d4f1513c6dc3b05dcdfc59428f3ba0d83723221",
    },
    "offload-flap": {
        "model.safetensors": "fab4c9f899002ccbd8a0f7300eaf43e97db886b349eff7623a9cfd746b2fc954",
        "report.json": "1738fd226745eb4f70059e65497be66cf440b6b413a00fa5ec3d1b8b36705fe1",
    },
}


# ---- running one shape -------------------------------------------------------------------------
def _text_files(root: Path) -> dict[str, Path]:
    folder = root / "text"
    files = {"calibration": folder / "calibration.txt", "test": folder / "test.txt"}
    if not folder.is_dir():
        folder.mkdir(parents=True)
        files["calibration"].write_text(CORPUS)
        files["test"].write_text(CORPUS[::-1])  # never calibrate on the evaluation text
    return files


def _model_dir(root: Path, model_type: str) -> Path:
    folder = root / "models" / model_type
    if not folder.is_dir():
        tiny_model(model_type).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    return folder


def shape_recipe(name: str, root: Path) -> dict:
    model_type, stages, model_options = SHAPES[name]
    text = _text_files(root)
    stages = [{**stage, "data": {"source": "text", "path": str(text["calibration"])}} if stage["method"] == "lora"
              else dict(stage) for stage in stages]
    folder = root / "".join(c if c.isalnum() else "_" for c in name)  # no ':' or '+' in paths
    model = {"name": str(_model_dir(root, model_type)), **model_options}
    if "max_memory" in model:
        model["max_memory"] = dict(model["max_memory"])
        model["offload_folder"] = str(folder / "offload")
    return {
        "model": model,
        "calibration": {"source": "text", "path": str(text["calibration"]), "num_samples": 8, "seq_len": 32,
                        "batch_size": 4},
        "stages": stages,
        "export": {"output": str(folder / "out")},
        "eval": {"ppl": 2, "text": str(text["test"]), "seq_len": 32},
    }


def _clean(value, roots: tuple[str, ...]):
    if isinstance(value, dict):
        return {key: _clean(item, roots) for key, item in value.items() if key not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_clean(item, roots) for item in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, TMP)
    return value


def cleaned_report(output: Path, root: Path) -> str:
    report = json.loads((output / "report.json").read_text())
    roots = tuple(sorted({str(root), str(root.resolve())}, key=len, reverse=True))
    return json.dumps(_clean(report, roots), sort_keys=True)


def digests(output: Path, root: Path) -> dict[str, str]:
    files = sorted(output.glob("*.safetensors"))
    if (output / "adapter" / "adapter_model.safetensors").is_file():
        files.append(output / "adapter" / "adapter_model.safetensors")
    found = {path.relative_to(output).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    found["report.json"] = hashlib.sha256(cleaned_report(output, root).encode()).hexdigest()
    return found


def run_shape(name: str, root: Path) -> dict[str, str]:
    import compress

    recipe = shape_recipe(name, root)
    logs: list[str] = []
    compress.run(recipe, progress=False, log=logs.append)
    if "max_memory" in recipe["model"]:
        assert any("3 of 3 decoder layers on disk" in line for line in logs), "the offloaded shape did not offload"
    return digests(Path(recipe["export"]["output"]), root)


# ---- the test ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def golden_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("name", list(SHAPES))
def test_output_bytes_match_the_pinned_digests(name, golden_root):
    assert name in GOLDEN, f"no pinned digests for shape '{name}': run `python -m tests.test_golden`"
    found = run_shape(name, golden_root)
    expected = GOLDEN[name]
    changed = [f"{file}: expected {expected.get(file, '(absent)')}, got {found.get(file, '(absent)')}"
               for file in sorted(expected.keys() | found.keys()) if expected.get(file) != found.get(file)]
    output = Path(shape_recipe(name, golden_root)["export"]["output"])
    assert not changed, (f"shape '{name}' wrote different bytes (output kept in {output}):\n  " + "\n  ".join(changed) +
                         "\nIf the change is deliberate, regenerate with `python -m tests.test_golden` and say why in "
                         "the commit message.")


def _literal(table: dict[str, dict[str, str]]) -> str:
    lines = ["GOLDEN: dict[str, dict[str, str]] = {"]
    for name, files in table.items():
        lines.append(f"    {name!r}: {{")
        lines.extend(f"        {file!r}: {digest!r}," for file, digest in files.items())
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines).replace("'", '"')


def main() -> None:
    names = sys.argv[1:] or list(SHAPES)
    with tempfile.TemporaryDirectory(prefix="compress-golden-") as folder, contextlib.redirect_stdout(sys.stderr):
        table = {name: run_shape(name, Path(folder)) for name in names}  # stdout: the literal alone
    print(_literal(table))


if __name__ == "__main__":
    main()
