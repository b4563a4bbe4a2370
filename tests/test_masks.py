"""Masks: exact counts per group, exact N:M patterns, clear errors for impossible patterns."""

import pytest
import torch

from compress.errors import UserError
from compress.ops.masks import follows_nm, make_mask, nm_mask, parse_pattern, unstructured_mask, zero_fraction


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_row_mask_removes_the_same_count_in_every_row(sparsity):
    scores = torch.rand(8, 40)
    keep = unstructured_mask(scores, sparsity, "row")
    assert (keep.sum(1) == 40 - int(40 * sparsity)).all()
    # the removed weights are each row's lowest
    for row in range(8):
        removed = scores[row][~keep[row]]
        if len(removed):
            assert removed.max() <= scores[row][keep[row]].min()


def test_unstructured_layer_mask_is_one_threshold():
    scores = torch.rand(8, 40)
    keep = unstructured_mask(scores, 0.5, "layer")
    assert int((~keep).sum()) == 160
    assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_has_exactly_n_per_block(n, m):
    scores = torch.rand(6, 32)
    keep = nm_mask(scores, n, m)
    assert (keep.reshape(6, -1, m).sum(-1) == n).all()
    assert follows_nm(scores * keep, n, m)
    assert not follows_nm(scores, n, m)


@pytest.mark.parametrize("pattern,message", [("3:2", "0 < N < M"), ("2:2", "0 < N < M"), ("two:four", "N:M")])
def test_bad_patterns(pattern, message):
    with pytest.raises(UserError, match=message):
        parse_pattern(pattern)


def test_m_must_divide_the_width():
    with pytest.raises(UserError, match="divide the input width"):
        make_mask(torch.rand(4, 30), 0.5, "4:8")


def test_zero_fraction():
    assert zero_fraction(torch.tensor([[0.0, 1.0], [0.0, 0.0]])) == 0.75
