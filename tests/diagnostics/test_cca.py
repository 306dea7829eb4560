"""CCA, SVCCA and PWCCA against a NumPy reference written here (the textbook
Sigma_xx^-1/2 Sigma_xy Sigma_yy^-1/2 route, ours goes through orthonormal bases instead), plus
invariances, the weighting PWCCA exists for, and the few-examples guard.

Neither test-only peer covers these: torch-cka and cka-pytorch implement CKA only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.diagnostics import cca, pwcca, svcca

TOL = 1e-6


def _pair(n: int = 500, dx: int = 20, dy: int = 30, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, dx, dtype=torch.float64) + 1.0
    y = torch.tanh(x @ torch.randn(dx, dy, generator=gen, dtype=torch.float64) / 3) + 0.5 * torch.randn(n, dy, generator=gen, dtype=torch.float64)
    return x, y


# ----- NumPy reference -----


def _inv_sqrt(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    return vecs @ np.diag(vals**-0.5) @ vecs.T


def _np_cca(x: np.ndarray, y: np.ndarray, epsilon: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(correlations (K,), x canonical variates (n, K)) by whitening the covariances."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = x.shape[0]
    sxx = xc.T @ xc / (n - 1) + epsilon * np.eye(x.shape[1])
    syy = yc.T @ yc / (n - 1) + epsilon * np.eye(y.shape[1])
    sxy = xc.T @ yc / (n - 1)
    wx = _inv_sqrt(sxx)
    u, rho, _ = np.linalg.svd(wx @ sxy @ _inv_sqrt(syy))
    k = min(x.shape[1], y.shape[1])
    return rho[:k], xc @ wx @ u[:, :k]


def _np_svd_reduce(x: np.ndarray, keep: float) -> np.ndarray:
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    explained = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(explained, keep)) + 1  # the first count reaching ``keep``
    return u[:, :k] * s[:k]


def _np_pwcca(x: np.ndarray, y: np.ndarray) -> float:
    rho, h = _np_cca(x, y)
    h = h / np.linalg.norm(h, axis=0)
    alpha = np.abs(h.T @ (x - x.mean(0))).sum(axis=1)
    return float(alpha @ rho / alpha.sum())


# ----- against the reference -----


def test_canonical_correlations_match_numpy():
    x, y = _pair()
    want, _ = _np_cca(x.numpy(), y.numpy())
    np.testing.assert_allclose(cca(x, y).correlations.numpy(), want, atol=TOL)
    assert 0.3 < want.mean() < 0.99


def test_svcca_matches_numpy():
    x, y = _pair(seed=1)
    for keep in (0.5, 0.99):
        rho, _ = _np_cca(_np_svd_reduce(x.numpy(), keep), _np_svd_reduce(y.numpy(), keep))
        assert svcca(x, y, variance_kept=keep) == pytest.approx(rho.mean(), abs=TOL)


def test_pwcca_matches_numpy():
    x, y = _pair(seed=2)
    assert pwcca(x, y) == pytest.approx(_np_pwcca(x.numpy(), y.numpy()), abs=TOL)


def test_ridge_cca_matches_numpy_also_with_fewer_examples_than_features():
    x, y = _pair(n=30, dx=40, dy=50, seed=3)
    want, _ = _np_cca(x.numpy(), y.numpy(), epsilon=0.1)
    got = cca(x, y, epsilon=0.1).correlations.numpy()  # K = 29: centred data have rank n - 1
    np.testing.assert_allclose(got, want[: got.size], atol=TOL)
    np.testing.assert_allclose(want[got.size :], 0.0, atol=TOL)  # the reference's extra ones vanish


# ----- properties -----


def test_cca_is_invariant_to_invertible_linear_maps():
    x, y = _pair(seed=4)
    gen = torch.Generator().manual_seed(5)
    mix_x = torch.randn(x.shape[1], x.shape[1], generator=gen, dtype=torch.float64)
    mix_y = torch.randn(y.shape[1], y.shape[1], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(cca(x @ mix_x + 7, y @ mix_y).correlations, cca(x, y).correlations, rtol=0, atol=1e-8)
    assert svcca(x, x @ mix_x, variance_kept=1.0) == pytest.approx(1.0, abs=1e-9)
    assert pwcca(x, x @ mix_x) == pytest.approx(1.0, abs=1e-9)


def test_variates_are_unit_norm_and_their_correlations_are_the_canonical_ones():
    x, y = _pair(seed=6)
    result = cca(x, y)
    torch.testing.assert_close(result.x_variates.norm(dim=0), torch.ones(20, dtype=torch.float64))
    torch.testing.assert_close((result.x_variates * result.y_variates).sum(0), result.correlations)


def test_svd_step_keeps_the_directions_that_carry_the_variance():
    gen = torch.Generator().manual_seed(7)
    signal = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    noise = 1e-3 * torch.randn(400, 17, generator=gen, dtype=torch.float64)
    x = torch.cat([signal, noise], dim=1) @ torch.linalg.qr(torch.randn(20, 20, generator=gen, dtype=torch.float64))[0]
    y = torch.cat([signal @ torch.randn(3, 3, generator=gen, dtype=torch.float64), torch.randn(400, 17, generator=gen, dtype=torch.float64) * 1e-3], dim=1)
    # The 3 signal directions are shared: SVCCA at 99% keeps only them and finds them all.
    assert svcca(x, y) == pytest.approx(1.0, abs=1e-6)
    assert cca(x, y, variance_kept=0.99).correlations.numel() == 3
    assert svcca(x, y, variance_kept=1.0) < 0.5  # with the 17 unrelated noise directions kept


def test_pwcca_weights_the_directions_that_carry_the_representation():
    gen = torch.Generator().manual_seed(8)
    big = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    small = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    x = torch.cat([10 * big, 0.1 * small], dim=1)  # (1000, 4): most of x lies along ``big``
    other = torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    shares_big = torch.cat([big, other], dim=1)
    shares_small = torch.cat([small, other], dim=1)
    # Plain CCA cannot tell the two apart (two correlations near 1, two near 0 each)...
    assert svcca(x, shares_big, variance_kept=1.0) == pytest.approx(svcca(x, shares_small, variance_kept=1.0), abs=0.02)
    # ...PWCCA can: sharing the high-variance half of x is what matters.
    assert pwcca(x, shares_big) > 0.9 > 0.2 > pwcca(x, shares_small)


# ----- errors -----


def test_few_examples_are_refused_without_ridge():
    x, y = _pair(n=30, dx=20, dy=20)
    with pytest.raises(ValueError, match=r"rank\(x\) \+ rank\(y\) > n - 1.*epsilon > 0"):
        cca(x, y)
    with pytest.raises(ValueError, match="same examples"):
        cca(x, y[:-1])
    with pytest.raises(ValueError, match="constant"):
        cca(torch.ones(30, 3), y)
    with pytest.raises(ValueError, match="variance_kept must be in"):
        svcca(x, y, variance_kept=1.5)
