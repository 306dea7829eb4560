"""Root-mean-square layer normalisation (RMSNorm).

Rescales each token by the inverse root mean square of its features, with a learned gain and no
centring and no bias.

Reference: Zhang and Sennrich 2019, Root Mean Square Layer Normalization, arXiv:1910.07467.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_EPS = 1e-6  # as in Llama / T5; small against the mean square of a unit-variance token


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, *, eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension.

        Args:
            x: (..., dim).

        Returns:
            (..., dim), in the dtype of ``x``.
        """
        # fp32 island: the mean of squares overflows in fp16 and loses digits in bf16 (float64 stays).
        compute = torch.promote_types(x.dtype, torch.float32)
        out = F.rms_norm(x.to(compute), (self.dim,), self.weight.to(compute), self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
