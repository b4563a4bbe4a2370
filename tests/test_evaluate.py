"""Perplexity follows the benchmark protocol and equals the model's own loss."""

import math

import torch

from compress.model.evaluate import eval_windows, perplexity
from tests.conftest import tiny_llama


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(1000)
    assert eval_windows(ids, 128, "full").shape == (7, 128)
    assert eval_windows(ids, 128, 3)[2, 0] == 256
    assert eval_windows(ids, 10, "quick").shape == (64, 10)


def test_chunked_perplexity_equals_the_model_loss():
    model = tiny_llama()
    windows = torch.randint(0, 320, (3, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert math.isclose(perplexity(model, windows), math.exp(sum(losses) / 3), rel_tol=1e-5)
