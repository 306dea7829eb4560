"""Stochastic depth: while training, a residual branch is dropped for a random subset of the batch's
items (its output zeroed for them, scaled by 1 / keep for the others so the expectation is kept);
at evaluation the branch always runs.

Reference: Huang et al. 2016, Deep Networks with Stochastic Depth, arXiv:1603.09382 (the linear
decay rule: block l of L drops with probability l / L * p_L); per-item drops as in DeiT, Touvron et
al. 2021, arXiv:2012.12877.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DropPath(nn.Module):
    """Zero a residual branch's output (B, ...) for each item with probability ``rate`` in training.

    Args:
        rate: the drop probability, in [0, 1).
    """

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path rate must lie in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        kept = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(keep)  # (B, 1, ...)
        return x * kept / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def linear_rates(rate: float, depth: int) -> list[float]:
    """Huang et al.'s linear rule over ``depth`` blocks: 0 for the first, ``rate`` for the last."""
    if depth <= 1:
        return [rate] * depth
    return [rate * i / (depth - 1) for i in range(depth)]
