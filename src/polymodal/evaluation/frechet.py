"""The Fréchet distance between two sets of feature vectors, each summarised by a Gaussian: the
figure of FID (Heusel et al. 2017, arXiv:1706.08500), in whatever feature space the caller picks.

d^2 = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). The symmetric form of the
matrix square root is used: S_a^1/2 S_b S_a^1/2 is symmetric positive semi-definite, so its square
root's trace is the sum of the square roots of its eigenvalues (``eigvalsh``), real by construction;
the usual ``sqrtm(S_a S_b)`` of a non-symmetric product can return complex parts from rounding.
Computed in float64 (a diagnostic), eigenvalues below zero from rounding clamped to zero.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) features -> mean (K,) and unbiased covariance (K, K), float64; N >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need (N, K) features with N >= 2, got {tuple(features.shape)}")
    x = features.double()
    return x.mean(0), torch.cov(x.T)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite (K, K) matrix."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(mean_a: Tensor, cov_a: Tensor, mean_b: Tensor, cov_b: Tensor) -> float:
    """d^2 between N(mean_a, cov_a) and N(mean_b, cov_b): means (K,), covariances (K, K)."""
    mean_a, cov_a, mean_b, cov_b = (t.double() for t in (mean_a, cov_a, mean_b, cov_b))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2  # symmetric to rounding
    cross = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """d^2 between the Gaussians fitted to (N, K) and (M, K) feature sets."""
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature widths differ: {tuple(features_a.shape)} and {tuple(features_b.shape)}")
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


def mean_pairwise_distance(items: Tensor) -> float:
    """Mean L2 distance over every pair of (N, ...) items (N >= 2), float64."""
    flat = items.flatten(1).double()
    if len(flat) < 2:
        raise ValueError(f"need at least two items, got {len(flat)}")
    distances = torch.cdist(flat, flat)  # (N, N), zero diagonal
    return float(distances.sum() / (len(flat) * (len(flat) - 1)))
