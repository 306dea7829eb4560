"""The Hilbert-Schmidt Independence Criterion (HSIC), biased and unbiased, from Gram matrices or,
for the linear kernel, straight from the features without any n x n matrix.

For Gram matrices K, L of n examples and the centring matrix H = I - 11^T / n:

    biased    HSIC_b = tr(K H L H) / (n - 1)^2                          (Gretton et al. 2005)
    unbiased  HSIC_u = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))

with K~, L~ the Gram matrices with their diagonals set to zero (Song et al. 2012, Feature Selection
via Dependence Maximization, JMLR 13; used for CKA by Nguyen et al. 2021, Do Wide and Deep
Networks Learn the Same Things?, arXiv:2010.15327). HSIC_u needs n >= 4.

Linear kernel, feature space (K = X X^T, L = Y Y^T): with X, Y column-centred (n, d) features,
HSIC_b = ||Y^T X||_F^2 / (n-1)^2, O(n dx dy) time and O(dx dy) memory instead of O(n^2 (dx + dy))
and O(n^2). HSIC_u is unchanged by centring the features, and after centring X^T 1 = 0, so with
a_i = |x_i|^2 and b_i = |y_i|^2 (the zeroed diagonals) its three terms become

    tr(K~ L~) = ||Y^T X||_F^2 - a.b,   1^T K~ 1 = -sum(a),   1^T K~ L~ 1 = (K~ 1).(L~ 1) = a.b

which is again O(n dx dy). Kornblith et al. 2019 (arXiv:1905.00414, section 3) give the biased
feature-space identity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.diagnostics._common import as_items, check_same_items, float64

# HSIC_u divides by n(n-3) and (n-1)(n-2): it is defined from 4 examples on.
MIN_ITEMS_UNBIASED = 4


def center_gram(k: Tensor) -> Tensor:
    """(n, n) -> (n, n) float64 ``H K H``: rows and columns of the Gram matrix centred."""
    k = float64(k)
    k = k - k.mean(dim=0, keepdim=True)
    return k.sub_(k.mean(dim=1, keepdim=True))  # in place: at n = 10k each copy is 800 MB


def gram_hsic(k: Tensor, l: Tensor, *, unbiased: bool = False, centered: bool = False) -> Tensor:
    """HSIC of two (n, n) Gram matrices over the same n examples.

    Args:
        k: (n, n) Gram matrix of the first representation (e.g. ``linear_gram(x)``).
        l: (n, n) Gram matrix of the second representation.
        unbiased: the unbiased U-statistic (n >= 4) instead of the biased V-statistic.
        centered: (biased only) the caller passes ``center_gram`` outputs already, so a CKA
            centres each Gram matrix once instead of once per HSIC.

    Returns:
        () float64 HSIC.
    """
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"k {tuple(k.shape)} and l {tuple(l.shape)} must be (n, n) Gram matrices of the same n")
    k, l = float64(k), float64(l)
    if unbiased:
        return _unbiased_from_grams(k, l)
    n = k.shape[0]
    check_same_items(k, l, min_items=2)
    if not centered:
        k, l = center_gram(k), center_gram(l)
    # tr(HKH HLH) = the sum of the elementwise product of the two symmetric centred Grams, taken
    # as one dot product so no third n x n matrix is made.
    return torch.dot(k.flatten(), l.flatten()) / (n - 1) ** 2


def _unbiased_from_grams(k: Tensor, l: Tensor) -> Tensor:
    """Song et al.'s HSIC_u from two float64 (n, n) Gram matrices."""
    n = k.shape[0]
    check_same_items(k, l, min_items=MIN_ITEMS_UNBIASED)
    k_off = k.clone().fill_diagonal_(0)  # K~
    l_off = l.clone().fill_diagonal_(0)  # L~
    trace = torch.dot(k_off.flatten(), l_off.flatten())  # tr(K~ L~); both symmetric, no n^3 product
    k_rows, l_rows = k_off.sum(dim=1), l_off.sum(dim=1)  # (n,) K~ 1 and L~ 1
    middle = k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2))
    cross = 2 * (k_rows @ l_rows) / (n - 2)  # 1^T K~ L~ 1 = (K~ 1) . (L~ 1)
    return (trace + middle - cross) / (n * (n - 3))


def centered_features(x: Tensor, name: str = "x") -> Tensor:
    """(n, ...) -> (n, d) float64 features with every column's mean removed."""
    x = as_items(x, name)
    return x - x.mean(dim=0, keepdim=True)


def feature_hsic(x: Tensor, y: Tensor, *, unbiased: bool = False, centered: bool = False) -> Tensor:
    """Linear-kernel HSIC from (n, d) features, without forming an n x n matrix.

    Args:
        x: (n, dx) features of the first representation, one row per example.
        y: (n, dy) features of the second representation, the same examples.
        unbiased: the unbiased U-statistic (n >= 4) instead of the biased V-statistic.
        centered: the caller passes ``centered_features`` already (skips two O(n d) passes; the
            CKA matrix centres each representation once).

    Returns:
        () float64 HSIC, equal to ``gram_hsic(linear_gram(x), linear_gram(y))`` up to rounding.
    """
    if not centered:
        x, y = centered_features(x, "x"), centered_features(y, "y")
    n = x.shape[0]
    check_same_items(x, y, min_items=MIN_ITEMS_UNBIASED if unbiased else 2)
    cross_cov = y.T @ x  # (dy, n) @ (n, dx) -> (dy, dx)
    frobenius = (cross_cov * cross_cov).sum()  # ||Y^T X||_F^2 = tr(K L) for centred features
    if not unbiased:
        return frobenius / (n - 1) ** 2
    a, b = (x * x).sum(dim=1), (y * y).sum(dim=1)  # (n,) the diagonals of K and L
    diag_product = a @ b
    trace = frobenius - diag_product  # tr(K~ L~)
    middle = a.sum() * b.sum() / ((n - 1) * (n - 2))  # (-sum a)(-sum b) / ((n-1)(n-2))
    cross = 2 * diag_product / (n - 2)
    return (trace + middle - cross) / (n * (n - 3))
