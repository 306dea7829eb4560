"""Gram matrices for kernel CKA: linear and RBF (Gaussian), with the RBF bandwidth set per
representation as a fraction of the median distance between its examples.

Kornblith et al. 2019, Similarity of Neural Network Representations Revisited, arXiv:1905.00414,
section 4 and table 2: the RBF width sigma is a fraction of the median Euclidean distance between
examples (they report 0.2, 0.4 and 0.8), so the kernel adapts to each layer's scale and CKA stays
invariant to isotropic scaling. Here "median" is over the n(n-1)/2 distances between distinct
examples, the average of the two middle values when that count is even (as ``numpy.median``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.diagnostics._common import as_items

# The widest of the paper's three widths; close to linear CKA on most layers, least noisy at small n.
DEFAULT_BANDWIDTH_FRACTION = 0.8


def linear_gram(x: Tensor) -> Tensor:
    """(n, d) -> (n, n) float64 inner products ``x @ x.T``."""
    x = as_items(x, "x")
    return x @ x.T  # (n, d) @ (d, n) -> (n, n)


def squared_distances(x: Tensor) -> Tensor:
    """(n, d) -> (n, n) float64 squared Euclidean distances, exactly 0 on the diagonal."""
    x = as_items(x, "x")
    sq_norms = (x * x).sum(dim=1)  # (n,)
    dist = sq_norms[:, None] + sq_norms[None, :] - 2 * (x @ x.T)  # (n, n)
    # |a|^2 + |b|^2 - 2ab cancels to slightly below 0 for near-identical rows; distances are >= 0.
    dist.clamp_(min=0).fill_diagonal_(0)
    return dist


def median_distance(sq_dist: Tensor) -> Tensor:
    """() median of the distances between distinct examples, from (n, n) squared distances (n >= 2)."""
    n = sq_dist.shape[0]
    if n < 2:
        raise ValueError(f"the median distance needs at least 2 examples, got {n}")
    # A boolean mask (n^2 bytes) rather than triu_indices (16 n^2 bytes of int64 indices).
    above_diagonal = torch.ones(n, n, dtype=torch.bool, device=sq_dist.device).triu_(diagonal=1)
    dist = sq_dist[above_diagonal].sqrt()  # (n(n-1)/2,)
    count = dist.numel()
    # kthvalue is 1-based and O(count); a full sort of n^2/2 values is not needed.
    upper = dist.kthvalue(count // 2 + 1).values
    if count % 2:
        return upper
    return (upper + dist.kthvalue(count // 2).values) / 2


def rbf_gram(x: Tensor, *, bandwidth_fraction: float = DEFAULT_BANDWIDTH_FRACTION) -> Tensor:
    """(n, d) -> (n, n) float64 ``exp(-|x_i - x_j|^2 / (2 sigma^2))``, sigma = fraction * median distance.

    Args:
        x: (n, d) representation, one row per example (n >= 2).
        bandwidth_fraction: sigma as a fraction of the median distance between distinct examples.

    Returns:
        (n, n) RBF Gram matrix, ones on the diagonal.
    """
    if bandwidth_fraction <= 0:
        raise ValueError(f"bandwidth_fraction must be positive, got {bandwidth_fraction}")
    sq_dist = squared_distances(x)
    sigma = bandwidth_fraction * median_distance(sq_dist)
    # When most examples coincide the median is 0: a tiny sigma keeps "identical -> 1, else -> 0"
    # instead of dividing by zero.
    sigma = sigma.clamp(min=torch.finfo(torch.float64).tiny ** 0.25)
    return torch.exp(-sq_dist / (2 * sigma**2))
