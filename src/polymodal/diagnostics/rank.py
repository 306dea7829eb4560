"""Effective rank of a representation: how many directions its examples really spread over. A
collapse detector: a representation that shrinks onto a few directions (dimensional collapse, or
all modalities mapped to one point) shows a falling effective rank long before the loss says so.

Roy & Vetterli 2007, The effective rank: a measure of effective dimensionality, EUSIPCO 2007:
with singular values s_1..s_Q of the matrix and p_k = s_k / sum(s),

    erank = exp(H(p)),  H(p) = -sum_k p_k log p_k

It lies in [1, rank]: 1 for a rank-one matrix, Q for Q equal singular values. Used as a training
monitor by Garrido et al. 2023, RankMe, arXiv:2210.02885.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.diagnostics._common import float64


def effective_rank(x: Tensor, *, center: bool = False) -> float:
    """Effective rank (Roy & Vetterli) of a representation.

    Args:
        x: (n, d) representation, one row per example (or (..., d): every leading position, e.g.
            each token of (B, N, D), is a row).
        center: remove each feature's mean first, measuring the spread around the mean (a shared
            offset otherwise counts as one direction); the paper's definition uses the matrix as is.

    Returns:
        exp of the entropy of the normalised singular values, in [1, min(n, d)]; 0.0 for an
        all-zero matrix (no direction at all).
    """
    if x.ndim < 2:
        raise ValueError(f"x must be (n, d) (or (..., d)), got shape {tuple(x.shape)}")
    x = float64(x).reshape(-1, x.shape[-1])  # (..., d) -> (n, d)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(x)  # (min(n, d),)
    total = singular.sum()
    if total <= 0:
        return 0.0
    p = singular / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))  # 0 log 0 = 0
