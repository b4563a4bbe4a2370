"""Releasing the file-backed pages of replaced weights keeps their values intact."""

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.model.memory import release_file_pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise release is Linux-only")
def test_released_pages_read_back_the_same_values(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    weight = model.model.layers[0].mlp.down_proj.weight
    expected = weight.detach().clone()
    released = release_file_pages(weight)
    assert released > 0  # loaded weights are memory-mapped from model.safetensors
    torch.testing.assert_close(weight.detach(), expected)


def test_anonymous_memory_is_left_alone():
    tensor = torch.randn(100_000)
    before = tensor.clone()
    assert release_file_pages(tensor) == 0
    torch.testing.assert_close(tensor, before)
