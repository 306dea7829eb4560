"""Prefix-LM and causal masks against a brute-force reading of their definition."""

from __future__ import annotations

import torch

from polymodal.models.masks import causal_mask, prefix_lm_mask


def _brute_force(is_target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    b, n = is_target.shape
    out = torch.zeros(b, 1, n, n, dtype=torch.bool)
    for s in range(b):
        for i in range(n):
            for j in range(n):
                rule = bool(valid[s, j]) and (not is_target[s, j] or (bool(is_target[s, i]) and j <= i))
                out[s, 0, i, j] = rule or i == j  # every token may attend itself (padding rows)
    return out


def test_causal_mask_by_hand():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3), expected)


def test_prefix_lm_mask_by_hand():
    # two sources, two targets, one pad
    is_target = torch.tensor([[False, False, True, True, False]])
    valid = torch.tensor([[True, True, True, True, False]])
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # source: both sources, no targets
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],  # first target: sources and itself
            [1, 1, 1, 1, 0],  # second target: sources and both targets
            [1, 1, 0, 0, 1],  # pad query (not a target): sources and itself; its output is unused
        ],
        dtype=torch.bool,
    )
    assert torch.equal(prefix_lm_mask(is_target, valid)[0, 0], expected)


def test_prefix_lm_mask_matches_brute_force_on_random_layouts():
    torch.manual_seed(0)
    n = 9
    lengths = torch.randint(1, n + 1, (6,))
    sources = (torch.rand(6) * lengths).long()
    idx = torch.arange(n)
    valid = idx[None] < lengths[:, None]
    is_target = (idx[None] >= sources[:, None]) & valid
    mask = prefix_lm_mask(is_target, valid)
    assert mask.shape == (6, 1, n, n) and mask.dtype == torch.bool
    assert torch.equal(mask, _brute_force(is_target, valid))
    assert mask.any(dim=-1).all()  # no fully masked query row
    # valid queries never attend padding
    assert not (mask[:, 0] & valid[:, :, None] & ~valid[:, None, :]).any()
