"""Canonical correlation analysis between two representations, and the two similarity indices
built on it: SVCCA and PWCCA.

CCA finds directions a_i, b_i whose projections (canonical variates) h_i = X a_i, g_i = Y b_i are
maximally correlated, each pair uncorrelated with the previous ones; rho_i = corr(h_i, g_i). Here
it is computed from orthonormal bases: with the centred X = U S V^T (null directions dropped),
the canonical correlations are the singular values of U_x^T U_y (Bjorck & Golub 1973), with no
covariance inverse formed. A ridge epsilon on the covariances, (S_xx + epsilon I)^-1/2, scales
the basis columns by sqrt(var / (var + epsilon)), var = s^2 / (n - 1).

- SVCCA (Raghu et al. 2017, SVCCA: Singular Vector Canonical Correlation Analysis for Deep
  Learning Dynamics and Interpretability, arXiv:1706.05806): keep the top singular directions of
  each representation that explain 99% of its variance, run CCA, report the mean correlation.
- PWCCA (Morcos et al. 2018, Insights on representational similarity in neural networks with
  canonical correlation, arXiv:1806.05759): weight rho_i by alpha_i = sum_j |<h_i, x_j>|
  (h_i unit-norm, x_j the centred neurons of the first representation), normalised to sum to 1,
  so the directions that carry more of X count more. Not symmetric in (x, y).

Few examples: centred data have rank <= n - 1, and when rank(X) + rank(Y) > n - 1 the two column
spaces must share directions, so some correlations are 1 whatever the data. Plain CCA refuses that
case (use more examples, the SVD reduction, or a ridge epsilon > 0). Even below it, sample CCA is
biased upward unless n is well above the widths (Raghu et al. use n >> d).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from polymodal.diagnostics.hsic import centered_features

# Raghu et al. keep the singular directions explaining 99% of the variance.
DEFAULT_VARIANCE_KEPT = 0.99


@dataclasses.dataclass(frozen=True)
class CCAResult:
    """Canonical correlations and variates of two representations of n examples.

    Attributes:
        correlations: (K,) float64 canonical correlations in [0, 1], descending, K = min(rx, ry).
        x_variates: (n, K) unit-norm canonical variates h_i of x (projections of the examples).
        y_variates: (n, K) unit-norm canonical variates g_i of y.
    """

    correlations: Tensor
    x_variates: Tensor
    y_variates: Tensor


def cca(x: Tensor, y: Tensor, *, epsilon: float = 0.0, variance_kept: float | None = None) -> CCAResult:
    """CCA of two representations of the same examples.

    Args:
        x: (n, dx) representation, one row per example.
        y: (n, dy) representation of the same examples.
        epsilon: ridge added to each covariance's diagonal; 0 is exact CCA, which needs
            rank(x) + rank(y) <= n - 1.
        variance_kept: first reduce each side to its top singular directions explaining this
            fraction of its variance (SVCCA's step); None keeps every direction.

    Returns:
        The correlations and the canonical variates.
    """
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    xc, yc = centered_features(x, "x"), centered_features(y, "y")
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"x has {xc.shape[0]} examples and y {yc.shape[0]}: compare the same examples, row for row")
    wx = _basis(xc, epsilon=epsilon, variance_kept=variance_kept, name="x")  # (n, rx)
    wy = _basis(yc, epsilon=epsilon, variance_kept=variance_kept, name="y")  # (n, ry)
    n, rx, ry = xc.shape[0], wx.shape[1], wy.shape[1]
    if epsilon == 0 and rx + ry > n - 1:
        raise ValueError(
            f"CCA of x (rank {rx}) and y (rank {ry}) over {n} examples: rank(x) + rank(y) > n - 1, so "
            f"{rx + ry - n + 1} canonical correlations would be 1 whatever the data. Use more examples "
            "(n well above the widths), reduce with variance_kept (SVCCA), or pass a ridge epsilon > 0"
        )
    left, rho, right_t = torch.linalg.svd(wx.T @ wy, full_matrices=False)  # (rx, ry) -> (rx, K), (K,), (K, ry)
    x_variates = torch.nn.functional.normalize(wx @ left, dim=0)  # (n, K)
    y_variates = torch.nn.functional.normalize(wy @ right_t.T, dim=0)  # (n, K)
    # Rounding can put the top correlation a few ulps above 1.
    return CCAResult(rho.clamp(0.0, 1.0), x_variates, y_variates)


def svcca(
    x: Tensor, y: Tensor, *, variance_kept: float = DEFAULT_VARIANCE_KEPT, epsilon: float = 0.0
) -> float:
    """SVCCA: the mean canonical correlation after keeping each side's top singular directions.

    Args:
        x: (n, dx) representation, one row per example.
        y: (n, dy) representation of the same examples.
        variance_kept: fraction of each side's variance its kept directions must explain.
        epsilon: ridge on the covariances (see ``cca``).

    Returns:
        Mean of the min(kx, ky) canonical correlations, in [0, 1].
    """
    return float(cca(x, y, epsilon=epsilon, variance_kept=variance_kept).correlations.mean())


def pwcca(x: Tensor, y: Tensor, *, epsilon: float = 0.0, variance_kept: float | None = None) -> float:
    """PWCCA: canonical correlations weighted by how much of ``x`` each canonical direction holds.

    Args:
        x: (n, dx) representation whose neurons set the weights, one row per example.
        y: (n, dy) representation of the same examples.
        epsilon: ridge on the covariances (see ``cca``).
        variance_kept: optional SVD reduction before CCA (None: none, as Morcos et al.).

    Returns:
        sum_i alpha_i rho_i with alpha_i = sum_j |<h_i, x_j>| normalised to sum to 1, in [0, 1].
    """
    result = cca(x, y, epsilon=epsilon, variance_kept=variance_kept)
    xc = centered_features(x, "x")  # (n, dx) the neurons x_j as columns
    alpha = (result.x_variates.T @ xc).abs().sum(dim=1)  # (K, n) @ (n, dx) -> (K, dx) -> (K,)
    return float((alpha / alpha.sum()) @ result.correlations)


def _basis(xc: Tensor, *, epsilon: float, variance_kept: float | None, name: str) -> Tensor:
    """(n, d) centred -> (n, r) whitened basis of its column space, ridge-shrunk when epsilon > 0."""
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)  # (n, k), (k,) with k = min(n, d)
    # numpy.linalg.matrix_rank's tolerance: singular values below it are rounding noise.
    rank = int((s > s.max() * max(xc.shape) * torch.finfo(s.dtype).eps).sum()) if s.numel() else 0
    if rank == 0:
        raise ValueError(f"{name} is constant over the examples (rank 0): CCA is undefined")
    if variance_kept is not None:
        if not 0 < variance_kept <= 1:
            raise ValueError(f"variance_kept must be in (0, 1], got {variance_kept}")
        explained = (s**2).cumsum(0) / (s**2).sum()  # (k,) fraction explained by the top i + 1
        rank = min(rank, int((explained < variance_kept).sum()) + 1)
    u, s = u[:, :rank], s[:rank]
    if epsilon == 0:
        return u
    var = s**2 / (xc.shape[0] - 1)  # (r,) variances along the principal directions
    return u * (var / (var + epsilon)).sqrt()
