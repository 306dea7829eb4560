"""Independence penalties between two representations of one batch: HSIC and the cross-covariance.

A shared-private model wants each modality's private code to carry nothing of the other's (or of
its own shared code); these terms measure the dependence between two (B, Dx) and (B, Dy) codes,
row i of each describing item i, and are 0 when the codes are independent.

HSIC, the Hilbert-Schmidt independence criterion (Gretton et al. 2005, Measuring Statistical
Dependence with Hilbert-Schmidt Norms, ALT), with Gram matrices K (of x) and L (of y), B = m:
    biased:   HSIC_b = tr(K H L H) / (m - 1)^2,  H = I - 11^T / m  (needs m >= 2);
    unbiased: with K~, L~ the Gram matrices with their diagonals zeroed (Song et al. 2012, Feature
        Selection via Dependence Maximization, JMLR 13:1393, eq. 5; needs m >= 4),
        HSIC_u = [tr(K~ L~) + 1^T K~ 1 * 1^T L~ 1 / ((m - 1)(m - 2)) - 2/(m - 2) 1^T K~ L~ 1] / (m (m - 3)).
The biased estimate is never below 0 and is biased upward by O(1/m); the unbiased one is centred on
the population value, so it can be slightly negative for independent samples.
Kernels: linear k(x, x') = x . x', or Gaussian k(x, x') = exp(-|x - x'|^2 / (2 sigma^2)) with
sigma the median distance between the batch's rows when not given (Gretton et al.'s heuristic),
computed without gradient so the bandwidth does not chase the penalty.

The cross-covariance penalty is |Cov(x, y)|_F^2 with the unbiased (B - 1) normalisation: the
decorrelation term of MISA-style models (Hazarika et al. 2020, arXiv:2005.03545), and exactly the
biased linear-kernel HSIC (tr(X X^T H Y Y^T H) = |X_c^T Y_c|_F^2), computed in O(B Dx Dy) instead
of O(B^2 (Dx + Dy)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.losses.views import centred, covariance, paired_views

KERNELS = ("linear", "rbf")
# The unbiased estimator divides by m (m - 3) and (m - 1)(m - 2): it needs four rows.
MIN_BATCH_UNBIASED = 4


def hsic(x: Tensor, y: Tensor, *, kernel: str = "linear", unbiased: bool = True, sigma: float | None = None) -> Tensor:
    """The Hilbert-Schmidt independence criterion between two codes of one batch.

    Args:
        x: (B, Dx) the first code.
        y: (B, Dy) the second code, row i describing the same item as ``x[i]``.
        kernel: ``linear`` or ``rbf`` (Gaussian), used for both codes.
        unbiased: Song et al.'s unbiased estimator (B >= 4) rather than Gretton et al.'s biased one.
        sigma: the Gaussian kernel's bandwidth; None: the median distance between rows, per code.

    Returns:
        () the estimate; about 0 for independent codes, larger the more they depend.
    """
    if kernel not in KERNELS:
        raise ValueError(f"hsic: unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if sigma is not None and sigma <= 0:
        raise ValueError(f"hsic: sigma must be > 0, got {sigma}; or None for the median heuristic")
    x, y = paired_views("hsic", x, y, min_batch=MIN_BATCH_UNBIASED if unbiased else 2)
    gram_x, gram_y = _gram(x, kernel, sigma), _gram(y, kernel, sigma)  # (B, B) each
    if unbiased:
        return _hsic_unbiased(gram_x, gram_y)
    batch = x.shape[0]
    # tr(K H L H) = sum of the entries of (H K H) * L, with H K H the double-centred K.
    double_centred = centred(centred(gram_x).T)  # H K H (K is symmetric), (B, B)
    return (double_centred * gram_y).sum() / (batch - 1) ** 2


def cross_covariance_penalty(x: Tensor, y: Tensor) -> Tensor:
    """The squared Frobenius norm of the cross-covariance between two codes of one batch.

    Args:
        x: (B, Dx) the first code.
        y: (B, Dy) the second code, row i describing the same item as ``x[i]``.

    Returns:
        () sum_ij Cov(x_i, y_j)^2 with the unbiased (B - 1) normalisation.
    """
    x, y = paired_views("cross_covariance_penalty", x, y)
    return covariance(centred(x), centred(y)).square().sum()


def _gram(x: Tensor, kernel: str, sigma: float | None) -> Tensor:
    """(B, D) -> (B, B) kernel matrix of the rows."""
    if kernel == "linear":
        return x @ x.T
    dist = torch.cdist(x, x)  # (B, B)
    if sigma is None:
        return torch.exp(-dist.square() / (2 * _median_distance(dist).square()))
    return torch.exp(-dist.square() / (2 * sigma**2))


def _median_distance(dist: Tensor) -> Tensor:
    """() the median over pairs i < j of a (B, B) distance matrix (the mean of the two middle
    values for an even count, as numpy's), without gradient; floored so equal rows give no 0."""
    with torch.no_grad():
        rows, cols = torch.triu_indices(*dist.shape, offset=1, device=dist.device)
        pairs = dist[rows, cols].sort().values  # (B (B - 1) / 2,)
        count = pairs.numel()
        median = (pairs[(count - 1) // 2] + pairs[count // 2]) / 2
        return median.clamp_min(torch.finfo(dist.dtype).tiny)


def _hsic_unbiased(gram_x: Tensor, gram_y: Tensor) -> Tensor:
    """Song et al.'s eq. 5 from two (B, B) Gram matrices."""
    m = gram_x.shape[0]
    k = gram_x - torch.diag_embed(gram_x.diagonal())  # K~: diagonal zeroed
    l = gram_y - torch.diag_embed(gram_y.diagonal())  # noqa: E741 (L~, the paper's name)
    trace_term = (k * l).sum()  # tr(K~ L~), both symmetric
    sums_term = k.sum() * l.sum() / ((m - 1) * (m - 2))
    cross_term = 2 / (m - 2) * (k.sum(dim=0) @ l.sum(dim=1))  # 1^T K~ L~ 1
    return (trace_term + sums_term - cross_term) / (m * (m - 3))
