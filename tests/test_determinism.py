"""Same recipe + seed -> byte-identical safetensors, for structured and weight-level methods."""

import hashlib

import pytest

import compress


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("stages", [
    [{"method": "flap", "sparsity": 0.3}],
    [{"method": "flap", "sparsity": 0.3, "round_to": 8}, {"method": "gblm", "sparsity": 0.5, "pattern": "2:4",
                                                              "cache_gradients": False}],
], ids=["flap", "flap+gblm-2:4"])
def test_two_runs_write_identical_bytes(tiny_recipe, tmp_path, stages):
    digests = []
    for run in ("a", "b"):
        recipe = {**tiny_recipe, "stages": stages, "export": {"output": str(tmp_path / run)}}
        recipe["calibration"] = {**recipe["calibration"], "seed": 3}
        compress.run(recipe, progress=False, log=lambda _: None)
        digests.append(_digest(tmp_path / run))
    assert digests[0] and digests[0] == digests[1]
