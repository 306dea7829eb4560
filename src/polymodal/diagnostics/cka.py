"""Centered Kernel Alignment (CKA): how alike two representations of the same examples are,
invariant to rotations and isotropic scaling of either (and, for linear CKA, to their widths).

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

over Gram matrices K, L of n examples (Kornblith et al. 2019, Similarity of Neural Network
Representations Revisited, arXiv:1905.00414). With the biased HSIC it is the cosine of the
centred Gram matrices; with the unbiased HSIC (Song et al. 2012; Nguyen et al. 2021,
arXiv:2010.15327) it no longer drifts with n, which is what lets minibatch estimates agree
(``minibatch_cka.py``) and what a small probe batch should use when values are compared across
batch sizes.

Linear CKA is computed in feature space (``hsic.feature_hsic``): ||Y^T X||_F^2 / (||X^T X||_F
||Y^T Y||_F) for centred X, Y, O(n d^2) with no n x n matrix; the Gram form is kept for the RBF
kernel and for widths above n, where it is the cheaper one. ``cka_matrix`` fills the (L1, L2)
table a heatmap of layers or modalities needs, preparing each representation once.

At a probe batch (n = 256) every measure here is a few small matrix products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from polymodal.diagnostics._common import float64
from polymodal.diagnostics.hsic import MIN_ITEMS_UNBIASED, center_gram, centered_features, feature_hsic, gram_hsic
from polymodal.diagnostics.kernels import DEFAULT_BANDWIDTH_FRACTION, linear_gram, rbf_gram

KERNELS = ("linear", "rbf")


def cka(
    x: Tensor,
    y: Tensor,
    *,
    kernel: str = "linear",
    unbiased: bool = False,
    bandwidth_fraction: float = DEFAULT_BANDWIDTH_FRACTION,
) -> float:
    """CKA between two representations of the same n examples.

    Args:
        x: (n, dx) representation (or (n, ...), flattened), one row per example.
        y: (n, dy) representation of the same examples, row for row.
        kernel: "linear" (feature-space form when both widths are <= n) or "rbf".
        unbiased: use the unbiased HSIC (n >= 4); the biased one otherwise.
        bandwidth_fraction: RBF width as a fraction of the median distance (``kernels.rbf_gram``).

    Returns:
        CKA in [0, 1] (the unbiased form can dip slightly below 0); NaN when either
        representation is constant over the examples.
    """
    matrix = cka_matrix([x], [y], kernel=kernel, unbiased=unbiased, bandwidth_fraction=bandwidth_fraction)
    return float(matrix[0, 0])


def gram_cka(k: Tensor, l: Tensor, *, unbiased: bool = False) -> float:
    """CKA from two (n, n) Gram matrices (any kernel); the O(n^2)-memory reference form."""
    prepare, hsic = _gram_estimator(unbiased)
    k, l = prepare(k), prepare(l)
    return _normalise(hsic(k, l), hsic(k, k), hsic(l, l))


def feature_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA from (n, dx) and (n, dy) features, O(n dx dy) time, no n x n matrix."""
    x, y = centered_features(x, "x"), centered_features(y, "y")
    hsic = _feature_pair(unbiased)
    return _normalise(hsic(x, y), hsic(x, x), hsic(y, y))


def cka_matrix(
    rows: Sequence[Tensor],
    cols: Sequence[Tensor] | None = None,
    *,
    kernel: str = "linear",
    unbiased: bool = False,
    bandwidth_fraction: float = DEFAULT_BANDWIDTH_FRACTION,
) -> Tensor:
    """CKA between every pair of representations: layers of one model, modalities, or two runs.

    Args:
        rows: L1 representations of the same n examples, each (n, d_i) (widths may differ).
        cols: L2 representations of the same examples; None compares ``rows`` with themselves
            (symmetric, ones on the diagonal, each pair computed once).
        kernel, unbiased, bandwidth_fraction: as ``cka``.

    Returns:
        (L1, L2) float64 CKA values, NaN where a representation is constant.
    """
    symmetric = cols is None
    cols = rows if cols is None else cols
    prepare, hsic = _estimator(kernel, unbiased, bandwidth_fraction, [*rows, *cols])
    row_reps = [prepare(x) for x in rows]
    col_reps = row_reps if symmetric else [prepare(y) for y in cols]
    row_self = torch.stack([hsic(r, r) for r in row_reps])  # (L1,)
    col_self = row_self if symmetric else torch.stack([hsic(c, c) for c in col_reps])  # (L2,)
    cross = row_self.new_empty(len(row_reps), len(col_reps))  # (L1, L2)
    for i, r in enumerate(row_reps):
        for j, c in enumerate(col_reps):
            if symmetric and j <= i:
                cross[i, j] = row_self[i] if i == j else cross[j, i]
            else:
                cross[i, j] = hsic(r, c)
    return _normalise_matrix(cross, row_self, col_self)


def _estimator(
    kernel: str, unbiased: bool, bandwidth_fraction: float, reps: Sequence[Tensor]
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """(prepare one representation once, HSIC of two prepared ones) for the chosen kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown CKA kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if not reps:
        raise ValueError("no representations given: pass a non-empty list of (n, d) tensors")
    for x in reps:
        if x.ndim < 2:
            raise ValueError(f"each representation must be (n, d) items x features, got shape {tuple(x.shape)}")
    num_items = {x.shape[0] for x in reps}
    if len(num_items) != 1:
        raise ValueError(f"all representations must hold the same examples, got item counts {sorted(num_items)}")
    n = num_items.pop()
    if unbiased and n < MIN_ITEMS_UNBIASED:
        raise ValueError(f"unbiased CKA needs at least {MIN_ITEMS_UNBIASED} examples, got {n}")
    widest = max(x[0].numel() for x in reps)
    if kernel == "linear" and widest <= n:  # O(n d^2) in feature space beats O(n^2 d) for the Grams
        return centered_features, _feature_pair(unbiased)
    gram = linear_gram if kernel == "linear" else (lambda x: rbf_gram(x, bandwidth_fraction=bandwidth_fraction))
    prepare, hsic = _gram_estimator(unbiased)
    return (lambda x: prepare(gram(x))), hsic


def _feature_pair(unbiased: bool) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, y: feature_hsic(x, y, unbiased=unbiased, centered=True)


def _gram_estimator(unbiased: bool) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]]:
    """(prepare a Gram matrix, HSIC of two prepared ones): the biased HSIC centres each Gram once."""
    if unbiased:
        return float64, lambda k, l: gram_hsic(k, l, unbiased=True)
    return center_gram, lambda k, l: gram_hsic(k, l, centered=True)


def _normalise(cross: Tensor, self_x: Tensor, self_y: Tensor) -> float:
    return float(_normalise_matrix(cross.reshape(1, 1), self_x.reshape(1), self_y.reshape(1))[0, 0])


def _normalise_matrix(cross: Tensor, row_self: Tensor, col_self: Tensor) -> Tensor:
    """(L1, L2) HSIC / sqrt(outer of the self-HSICs); NaN where a self-HSIC is not positive."""
    denom_sq = row_self[:, None] * col_self[None, :]  # (L1, L2)
    valid = (row_self[:, None] > 0) & (col_self[None, :] > 0)
    nan = torch.full_like(cross, float("nan"))
    return torch.where(valid, cross / denom_sq.clamp(min=torch.finfo(cross.dtype).tiny).sqrt(), nan)
