"""Alignment losses: VICReg and Barlow Twins against lightly's ``VICRegLoss`` and ``BarlowTwinsLoss``
(values and gradients), deep CCA against scipy's principal angles between the two views' column
spaces (whose cosines are the canonical correlations), hand-checkable inputs, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from polymodal.losses.alignment import barlow_twins, dcca, vicreg

BATCH, DIM = 64, 16


def _views(batch: int = BATCH, dim: int = DIM, *, seed: int = 0, dtype=torch.float32):
    """Two (batch, dim) views sharing a component, so every term of the losses is away from 0."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    a = 0.7 * common + 0.5 * torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    b = 1.3 * common + 0.4 * torch.randn(batch, dim, generator=gen, dtype=torch.float64) + 0.2
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()


def _value_and_grads(fn, a, b):
    loss = fn(a, b)
    return (loss.detach(), *torch.autograd.grad(loss, [a, b]))


@pytest.mark.parametrize(
    "settings",
    [{}, {"invariance_weight": 1.0, "variance_weight": 3.0, "covariance_weight": 0.5, "eps": 1e-3}],
    ids=["paper", "other-weights"],
)
def test_vicreg_equals_lightly(peer_module, settings):
    lightly = peer_module("lightly.loss.vicreg_loss")
    peer = lightly.VICRegLoss(
        lambda_param=settings.get("invariance_weight", 25.0), mu_param=settings.get("variance_weight", 25.0),
        nu_param=settings.get("covariance_weight", 1.0), eps=settings.get("eps", 1e-4),
    )  # fmt: skip
    for seed in range(3):
        a, b = _views(seed=seed)
        ours = _value_and_grads(lambda a, b: vicreg(a, b, **settings), a, b)
        theirs = _value_and_grads(peer, a, b)
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("redundancy_weight", [5e-3, 0.1])
def test_barlow_twins_equals_lightly(peer_module, redundancy_weight):
    peer = peer_module("lightly.loss.barlow_twins_loss").BarlowTwinsLoss(lambda_param=redundancy_weight)
    for seed in range(3):
        a, b = _views(seed=seed)
        ours = _value_and_grads(lambda a, b: barlow_twins(a, b, redundancy_weight=redundancy_weight), a, b)
        theirs = _value_and_grads(peer, a, b)
        for got, want in zip(ours, theirs):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_vicreg_and_barlow_twins_by_hand():
    # Two rows: each feature is +-1 about its mean, variance 2 (unbiased) and 1 (biased).
    a = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    # Identical views: no invariance term; std sqrt(2) > 1: no variance term; features equal: the
    # covariance matrix is [[2, 2], [2, 2]], off-diagonal 2 * 2^2 / D=2 = 4 per view.
    assert vicreg(a, a, eps=0.0).item() == pytest.approx(8.0)
    # Standardised views are equal, so C = [[1, 1], [1, 1]]: no on-diagonal loss, 2 off-diagonal ones.
    assert barlow_twins(a, a, redundancy_weight=0.25, eps=0.0).item() == pytest.approx(0.5)
    # b = -a: C = -[[1, 1], [1, 1]]; on-diagonal 2 * (1 - (-1))^2 = 8.
    assert barlow_twins(a, -a, redundancy_weight=0.0, eps=0.0).item() == pytest.approx(8.0)


def _canonical_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosines of the principal angles between the column spaces of the centred views."""
    angles = scipy.linalg.subspace_angles(a - a.mean(0), b - b.mean(0))
    return np.cos(angles)


@pytest.mark.parametrize("dims", [(5, 5), (6, 3), (3, 7)])
def test_dcca_total_correlation_equals_the_sum_of_canonical_correlations(dims):
    gen = np.random.default_rng(1)
    dim_a, dim_b = dims
    a = gen.standard_normal((500, dim_a))
    # b is a linear map of a plus noise of growing size per feature, so the correlations spread out.
    b = a @ gen.standard_normal((dim_a, dim_b)) + gen.standard_normal((500, dim_b)) * np.linspace(0.3, 3, dim_b)
    expected = _canonical_correlations(a, b)
    assert expected.min() < 0.9 and expected.max() > 0.5  # a spread of correlations, not all ~1
    loss = dcca(torch.from_numpy(a), torch.from_numpy(b), regularization=1e-9)
    assert loss.dtype == torch.float64
    assert -loss.item() == pytest.approx(expected.sum(), rel=1e-7)
    top2 = dcca(torch.from_numpy(a), torch.from_numpy(b), regularization=1e-9, num_components=2)
    assert -top2.item() == pytest.approx(np.sort(expected)[-2:].sum(), rel=1e-7)
    # In fp32 (the training path) it agrees to fp32 accuracy.
    loss32 = dcca(torch.from_numpy(a).float(), torch.from_numpy(b).float(), regularization=1e-9)
    assert -loss32.item() == pytest.approx(expected.sum(), rel=1e-4)


def test_dcca_properties_and_gradient():
    a, b = _views(dtype=torch.float64)
    loss = dcca(a, b)
    # Invariant to an invertible linear map of either view (CCA sees only the spanned subspaces).
    mixing = torch.randn(DIM, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert dcca(a @ mixing, b, regularization=1e-12).item() == pytest.approx(dcca(a, b, regularization=1e-12).item(), rel=1e-6)
    # Perfectly correlated views: every correlation is 1.
    assert dcca(a, 2 * a + 1, regularization=1e-12).item() == pytest.approx(-DIM, rel=1e-6)
    assert -DIM <= loss.item() <= 0
    small_a, small_b = (x.detach()[:12, :3].clone().requires_grad_() for x in (a, b))
    assert torch.autograd.gradcheck(lambda x, y: dcca(x, y), (small_a, small_b))


def test_losses_keep_fp32_under_bf16_inputs():
    a, b = _views(dtype=torch.bfloat16)
    for fn in (vicreg, barlow_twins, dcca):
        loss = fn(a, b)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        reference = fn(a.detach().float(), b.detach().float())
        torch.testing.assert_close(loss.detach(), reference)


@pytest.mark.parametrize(
    "a_shape, b_shape, fn, match",
    [
        ((8, 4), (8, 5), vicreg, "project both views to one width"),
        ((8, 4), (7, 4), barlow_twins, "same item"),
        ((8, 2, 4), (8, 2, 4), vicreg, "flatten tokens"),
        ((1, 4), (1, 4), dcca, "at least 2"),
    ],
)
def test_bad_inputs_are_named(a_shape, b_shape, fn, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(a_shape), torch.randn(b_shape))
    with pytest.raises(ValueError, match="num_components"):
        dcca(torch.randn(8, 3), torch.randn(8, 2), num_components=3)
