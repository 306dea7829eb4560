"""Alignment losses between two views of one batch: VICReg, Barlow Twins and deep CCA.

Each takes (B, D) views whose row i describes the same item (an image's shared code and its
caption's) and pulls the two together while keeping the features informative, so the shared
subspace of a shared-private model learns what both modalities hold.

VICReg (Bardes et al. 2021, arXiv:2105.04906):
    loss = lambda * s(A, B) + mu * (v(A) + v(B)) / 2 + nu * (c(A) + c(B))
    s: mean squared difference of paired entries (invariance);
    v(Z) = mean_j relu(1 - sqrt(Var z_j + eps)) keeps every feature's std near 1 (variance);
    c(Z) = sum_{i != j} Cov(Z)_ij^2 / D decorrelates features (covariance).
  The halved variance term and the invariance term as a mean over B * D entries follow the
  authors' code (and lightly's ``VICRegLoss``); the paper's lambda = mu = 25, nu = 1 are the defaults.

Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): with each feature standardised over the
batch (biased variance, as ``BatchNorm1d(affine=False)`` in the authors' code), the (D, D)
cross-correlation C = A_n^T B_n / B should be the identity:
    loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2,  lambda = 5e-3 (the paper's).

Deep CCA (Andrew et al. 2013, Deep Canonical Correlation Analysis, ICML, PMLR 28(3):1247): the
canonical correlations of the two views are the singular values of
    T = S_aa^{-1/2} S_ab S_bb^{-1/2},  S_aa = A_c^T A_c / (B - 1) + r I  (likewise S_bb),
and the objective is their sum (the trace norm of T), or the sum of the top k. The loss returned
is minus that. We whiten with Cholesky factors (S = L L^T) instead of S^{-1/2}: L^{-1} differs
from S^{-1/2} by a rotation, which leaves the singular values unchanged, and the backward pass of
``cholesky`` stays finite where that of ``eigh`` divides by gaps between equal eigenvalues.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.losses.views import centred, covariance, paired_views

# Barlow Twins standardises with BatchNorm1d's default epsilon (the authors' code uses that layer).
BARLOW_EPS = 1e-5
# VICReg's epsilon inside the std, from the paper (section 3.1).
VICREG_EPS = 1e-4
# A ridge on each view's covariance: it keeps the Cholesky factor defined when a feature has no
# variance in the batch (B <= D, or a collapsed feature). The paper tunes r1, r2 on held-out data;
# 1e-3 is small next to the unit variance of standardised features.
DCCA_REGULARIZATION = 1e-3


def vicreg(
    a: Tensor,
    b: Tensor,
    *,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = VICREG_EPS,
) -> Tensor:
    """VICReg: invariance between the views, variance and decorrelation within each.

    Args:
        a: (B, D) the first view.
        b: (B, D) the second view, row i paired with ``a[i]``.
        invariance_weight: the paper's lambda.
        variance_weight: the paper's mu.
        covariance_weight: the paper's nu.
        eps: added to each feature's variance before the square root.

    Returns:
        () the loss.
    """
    a, b = paired_views("vicreg", a, b, same_width=True)
    invariance = (a - b).square().mean()
    variance = (_std_hinge(a, eps) + _std_hinge(b, eps)) / 2
    dim = a.shape[1]
    a, b = centred(a), centred(b)
    decorrelation = (_off_diagonal_square_sum(covariance(a, a)) + _off_diagonal_square_sum(covariance(b, b))) / dim
    return invariance_weight * invariance + variance_weight * variance + covariance_weight * decorrelation


def barlow_twins(a: Tensor, b: Tensor, *, redundancy_weight: float = 5e-3, eps: float = BARLOW_EPS) -> Tensor:
    """Barlow Twins: the cross-correlation of the standardised views driven to the identity.

    Args:
        a: (B, D) the first view.
        b: (B, D) the second view, row i paired with ``a[i]``.
        redundancy_weight: the paper's lambda, on the off-diagonal (redundancy) term.
        eps: added to each feature's biased variance before standardising.

    Returns:
        () the loss.
    """
    a, b = paired_views("barlow_twins", a, b, same_width=True)
    batch = a.shape[0]
    correlation = _standardised(a, eps).T @ _standardised(b, eps) / batch  # (D, D)
    on_diagonal = (1 - correlation.diagonal()).square().sum()
    return on_diagonal + redundancy_weight * _off_diagonal_square_sum(correlation)


def dcca(
    a: Tensor, b: Tensor, *, regularization: float = DCCA_REGULARIZATION, num_components: int | None = None
) -> Tensor:
    """Deep CCA: minus the sum of the canonical correlations of two views.

    Args:
        a: (B, Da) the first view.
        b: (B, Db) the second view, row i paired with ``a[i]``.
        regularization: r, added to the diagonal of each view's covariance.
        num_components: sum only the k largest correlations (the paper's o); None sums all
            min(Da, Db) of them (the trace norm of T).

    Returns:
        () minus the summed canonical correlations, in [-min(Da, Db), 0].
    """
    a, b = paired_views("dcca", a, b)
    if num_components is not None and not 1 <= num_components <= min(a.shape[1], b.shape[1]):
        raise ValueError(f"dcca: num_components must be in 1..{min(a.shape[1], b.shape[1])}, got {num_components}")
    a, b = centred(a), centred(b)
    whiten_a = _cholesky(covariance(a, a), regularization)  # (Da, Da) lower triangular
    whiten_b = _cholesky(covariance(b, b), regularization)  # (Db, Db)
    cross = covariance(a, b)  # (Da, Db)
    # T = L_a^{-1} S_ab L_b^{-T}, as two triangular solves rather than explicit inverses.
    left = torch.linalg.solve_triangular(whiten_a, cross, upper=False)  # L_a^{-1} S_ab, (Da, Db)
    transfer = torch.linalg.solve_triangular(whiten_b, left.T, upper=False).T  # (Da, Db)
    correlations = torch.linalg.svdvals(transfer)  # descending, min(Da, Db)
    return -correlations[:num_components].sum()


def _std_hinge(x: Tensor, eps: float) -> Tensor:
    """VICReg's variance term: the mean over features of relu(1 - std)."""
    return torch.relu(1 - torch.sqrt(x.var(dim=0) + eps)).mean()


def _standardised(x: Tensor, eps: float) -> Tensor:
    """(B, D) -> (B, D): each feature at mean 0 and (biased) variance 1 over the batch."""
    return centred(x) / torch.sqrt(x.var(dim=0, unbiased=False) + eps)


def _off_diagonal_square_sum(matrix: Tensor) -> Tensor:
    """Sum of the squared off-diagonal entries of a square matrix."""
    return matrix.square().sum() - matrix.diagonal().square().sum()


def _cholesky(cov: Tensor, regularization: float) -> Tensor:
    """The lower Cholesky factor of ``cov + r I``, with a clear error when even that is singular."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    factor, info = torch.linalg.cholesky_ex(cov + regularization * eye)
    if info.item() != 0:
        raise ValueError(f"dcca: a view's covariance + {regularization} I is not positive definite; raise regularization")
    return factor
