"""docs/scaling.py's own arithmetic: the power-law fit and the memory bound it checks every run against."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fit_recovers_a_known_power_law(scaling):
    xs = [1e12, 4e12, 3e13, 2e14]
    c, k = scaling.fit_power(xs, [3e-11 * x**1.1 for x in xs])
    assert k == pytest.approx(1.1, abs=1e-9) and c == pytest.approx(3e-11, rel=1e-6)


def row(method, dtype="bfloat16", n=32):
    h, f, layers, heads = 2048, 8192, 24, 32
    layer = h * h * 4 + 3 * h * f + 2 * h
    return {"method": method, "dtype": dtype, "hidden": h, "width": f, "layers": layers, "heads": heads,
            "kv_heads": heads, "layer_params": layer, "params": layers * layer + 49152 * h + h, "vocab": 49152,
            "tokens": n * 512}


def test_the_bound_is_the_weights_plus_one_layer_plus_a_gib(scaling):
    flap = scaling.working_set_mib(row("flap"))
    assert flap["resident_mib"] == pytest.approx(row("flap")["params"] * 2 / 2**20)
    assert flap["bound_mib"] == pytest.approx(flap["resident_mib"] + flap["working_set_mib"] + 1024)
    assert sum(flap["terms_mib"].values()) == pytest.approx(flap["working_set_mib"])
    # the calibration hidden states grow with the tokens, the statistics with the width squared
    more = scaling.working_set_mib(row("flap", n=128))
    assert more["terms_mib"]["hidden_states"] == pytest.approx(4 * flap["terms_mib"]["hidden_states"])
    assert flap["terms_mib"]["statistics"] == pytest.approx(12 * (2048**2 + 8192**2) / 2**20)
    # SparseGPT keeps every input's Hessian; Wanda none; float32 weights are twice bfloat16's
    assert scaling.working_set_mib(row("sparsegpt"))["working_set_mib"] > flap["working_set_mib"]
    assert "statistics" not in scaling.working_set_mib(row("wanda"))["terms_mib"]
    assert scaling.working_set_mib(row("floor", "float32"))["resident_mib"] == pytest.approx(2 * flap["resident_mib"])


def test_every_case_names_a_known_model_and_method(scaling):
    cases = scaling.cases()
    assert {spec["model"] for spec in cases.values()} == {*scaling.SHAPES, scaling.REAL}
    assert {spec["method"] for spec in cases.values()} <= {"floor", "flap-offload", *scaling.METHODS}
    assert all(name == f"{spec['model']}:{spec['method']}:{spec['n']}" for name, spec in cases.items())
