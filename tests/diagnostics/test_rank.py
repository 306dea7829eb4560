"""Effective rank: identity, rank-one and hand-computed spectra, a NumPy reference, invariances,
and a representation collapsing step by step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from polymodal.diagnostics import effective_rank


def test_identity_has_full_effective_rank_and_rank_one_has_one():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0)
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)  # float32 rounding is not rank one
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2.0)


def test_hand_computed_spectrum():
    x = torch.diag(torch.tensor([3.0, 1.0]))  # p = (0.75, 0.25)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(x) == pytest.approx(math.exp(entropy))


def test_matches_numpy_and_is_invariant_to_rotation_and_scale():
    x = torch.randn(200, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * torch.logspace(0, -2, 30, dtype=torch.float64)
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-10)
    rotation, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    assert effective_rank(5.0 * x @ rotation) == pytest.approx(effective_rank(x), rel=1e-10)


def test_centering_removes_a_shared_offset():
    offset = torch.ones(40, 6) * torch.arange(1.0, 7.0)
    assert effective_rank(offset) == pytest.approx(1.0)
    assert effective_rank(offset, center=True) == 0.0  # nothing varies around the mean
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    assert effective_rank(x + 100 * offset, center=True) == pytest.approx(effective_rank(x, center=True), rel=1e-6)


def test_a_collapsing_representation_shows_a_falling_effective_rank():
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ranks = [effective_rank(x * torch.logspace(0, -power, 32, dtype=torch.float64)) for power in (0, 1, 2, 4)]
    assert all(a > b for a, b in zip(ranks, ranks[1:]))
    assert ranks[0] > 25 and ranks[-1] < ranks[0] / 3


def test_token_representations_flatten_to_rows():
    tokens = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(4))  # (B, N, D)
    assert effective_rank(tokens) == pytest.approx(effective_rank(tokens.reshape(40, 8)))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        effective_rank(torch.ones(5))
