"""Kill a run (SIGKILL) at many points; the same command again resumes and writes identical bytes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent

# (stages, fault points): where the process kills itself (see compress.workdir.fault_point)
SCENARIOS = {
    "flap": ([{"method": "flap", "sparsity": 0.3}],
             ["stage-0/hidden.safetensors:partial", "stage-0/result.safetensors", "export:staged"]),
    "wanda_sp": ([{"method": "wanda_sp", "sparsity": 0.3}],
                 ["stage-0/layer-0002.safetensors:partial"]),
    "flap+gblm-2:4": ([{"method": "flap", "sparsity": 0.3, "round_to": 8, "compensation": "bias"},
                       {"method": "gblm", "sparsity": 0.5, "pattern": "2:4", "cache_gradients": False}],
                      ["stage-0/result.safetensors", "stage-1/layer-0001.safetensors"]),
    "wanda-owl": ([{"method": "wanda", "sparsity": 0.5, "owl": True}],
                  ["stage-0/owl.safetensors"]),
    # experts' channel orders and per-expert compensation statistics wait on disk; sequential
    # stages restore sliced fused expert tensors
    "mixtral-flap+wanda_sp": ([{"method": "flap", "sparsity": 0.3}, {"method": "wanda_sp", "sparsity": 0.2}],
                              ["stage-0/result.safetensors", "stage-1/layer-0001.safetensors"], "mixtral"),
    # STUN: routing statistics per layer, layers before the resumed depth pruned again from them; the
    # finished stage's fewer experts and router rows restored before the weight stage resumes
    "mixtral-stun+wanda": ([{"method": "stun", "experts_to_keep": 3}, {"method": "wanda", "sparsity": 0.5}],
                           ["stage-0/layer-0001.safetensors", "stage-1/layer-0001.safetensors"], "mixtral"),
    "qwen3_moe-stun-global": ([{"method": "stun", "sparsity": 0.25, "budget": "global"}],
                              ["stage-0/layer-0002.safetensors", "export:staged"], "qwen3_moe"),
    # Týr: a finished search round is not redone; the final sequential pruning resumes per layer
    "tyr": ([{"method": "tyr", "sparsity": 0.3, "rounds": 2, "generations": 2, "offspring": 4, "fitness_windows": 2,
              "stage_windows": [1, 2], "kl_top": 32}],
            ["stage-0/round-0.safetensors", "stage-0/supernet-1-0001.safetensors", "stage-0/layer-0001.safetensors"]),
    # OLMoE (attention kept whole): scores of units that cannot be removed are saved and restored as such
    "olmoe-flap": ([{"method": "flap", "sparsity": 0.3}], ["stage-0/layer-0002.safetensors"], "olmoe"),
}


def run(recipe: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMPRESS_FAULT_AT": fault or ""}
    code = "import json, sys, compress; compress.run(json.loads(sys.argv[1]), progress=False, log=lambda _: None)"
    return subprocess.run([sys.executable, "-c", code, json.dumps(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("name", SCENARIOS)
def test_killed_runs_resume_to_the_same_checkpoint(name, tiny_recipe, tmp_path):
    stages, faults, *model_type = SCENARIOS[name]
    recipe = {**tiny_recipe, "stages": stages, "eval": {**tiny_recipe["eval"], "ppl": "none", "dense": False}}
    recipe["model"] = {**recipe["model"], "name": str(tiny_recipe["model"]["name"])}
    if model_type:
        folder = tmp_path / model_type[0]
        tiny_model(model_type[0]).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        recipe["model"]["name"] = str(folder)
    reference = tmp_path / "reference"
    assert run({**recipe, "export": {"output": str(reference)}}).returncode == 0
    expected = digest(reference)
    assert expected
    for fault in faults:
        output = tmp_path / f"out-{fault.replace('/', '_').replace(':', '_')}"
        killed = run({**recipe, "export": {"output": str(output)}}, fault)
        assert killed.returncode == -9, f"{fault}: the run was not killed ({killed.returncode}) {killed.stderr[-500:]}"
        assert not output.exists(), "the output folder appeared before the run was complete"
        work = output.parent / f".{output.name}.work"
        assert work.is_dir()
        resumed = run({**recipe, "export": {"output": str(output)}})
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert digest(output) == expected, f"resumed after '{fault}' differs from the uninterrupted run"
        assert not work.exists()  # cleaned up once exported
        assert not list(output.parent.glob(f".{output.name}.partial-*"))


def test_a_different_recipe_does_not_reuse_progress(tiny_recipe, tmp_path):
    recipe = {**tiny_recipe, "eval": {**tiny_recipe["eval"], "ppl": "none", "dense": False}}
    output = tmp_path / "out"
    assert run({**recipe, "export": {"output": str(output)}}, "stage-0/result.safetensors").returncode == -9
    other = {**recipe, "stages": [{"method": "flap", "sparsity": 0.1}], "export": {"output": str(output)}}
    assert run(other).returncode == 0
    report = json.loads((output / "report.json").read_text())
    assert abs(report["sparsity"]["achieved_decoder_linear"] - 0.1) < 0.05


def test_progress_is_tied_to_the_recipe_and_the_code(tiny_recipe, monkeypatch):
    from compress.recipe import load_recipe
    from compress.workdir import recipe_fingerprint
    recipe = load_recipe(tiny_recipe)
    first = recipe_fingerprint(recipe)
    assert recipe_fingerprint(load_recipe({**tiny_recipe, "eval": {"ppl": "none"}})) == first  # eval: no effect
    assert recipe_fingerprint(load_recipe({**tiny_recipe, "stages": [{"method": "flap", "sparsity": 0.2}]})) != first
    monkeypatch.setattr("compress.workdir.code_fingerprint", lambda: "other code")
    assert recipe_fingerprint(recipe) != first
    monkeypatch.undo()
    assert recipe_fingerprint(recipe) == first
    # audit R7: the model's contents, the library versions and the thread count are part of it
    import os

    weights = Path(tiny_recipe["model"]["name"]) / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the model was rebuilt
    try:
        assert recipe_fingerprint(recipe) != first
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert recipe_fingerprint(recipe) == first
    monkeypatch.setattr("compress.workdir.library_versions", lambda: {"torch": "9.9"})
    assert recipe_fingerprint(recipe) != first
    monkeypatch.undo()
    assert recipe_fingerprint(load_recipe({**tiny_recipe, "threads": 1})) != first
