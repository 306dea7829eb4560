"""Two views of one batch, as the alignment and independence losses take them: the checks every
such loss makes, and the fp32 island they compute in.

A view is a (B, D) matrix whose row i describes item i of the batch (an image's shared code and
its caption's, a private and a shared code of one image ...). Statistics over the batch (means,
covariances, Gram matrices) are sums of B products that bf16 keeps to about three digits, so every
loss here promotes its inputs to at least float32 (float64 stays float64, for tests and
diagnostics).
"""

from __future__ import annotations

import torch
from torch import Tensor


def paired_views(
    loss: str, a: Tensor, b: Tensor, *, min_batch: int = 2, same_width: bool = False
) -> tuple[Tensor, Tensor]:
    """Check two views and return them promoted to at least float32.

    Args:
        loss: the loss's name, for the error messages.
        a: (B, Da) the first view.
        b: (B, Db) the second view, row i paired with ``a[i]``.
        min_batch: the fewest rows the loss's estimator is defined for.
        same_width: whether the loss compares features one to one (Da == Db).

    Returns:
        ``a`` and ``b`` in ``promote_types(dtype, float32)``.

    Raises:
        ValueError: a view is not 2-D, the batches differ or are too small, or the widths differ
            where they must agree.
    """
    for name, view in (("a", a), ("b", b)):
        if view.dim() != 2:
            raise ValueError(f"{loss}: {name} must be (B, D), got shape {tuple(view.shape)}; flatten tokens into the batch first")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{loss}: a has {a.shape[0]} rows and b {b.shape[0]}; row i of each must describe the same item")
    if a.shape[0] < min_batch:
        raise ValueError(f"{loss}: needs a batch of at least {min_batch}, got {a.shape[0]}")
    if same_width and a.shape[1] != b.shape[1]:
        raise ValueError(f"{loss}: a is {a.shape[1]} wide and b {b.shape[1]}; project both views to one width")
    # fp32 island: batch statistics summed over B rows lose most of their digits in bf16.
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return a.to(dtype), b.to(dtype)


def centred(x: Tensor) -> Tensor:
    """(B, D) -> (B, D): each feature minus its mean over the batch."""
    return x - x.mean(dim=0, keepdim=True)


def covariance(x: Tensor, y: Tensor) -> Tensor:
    """The (Dx, Dy) unbiased cross-covariance of two centred (B, Dx) and (B, Dy) views."""
    return x.T @ y / (x.shape[0] - 1)
