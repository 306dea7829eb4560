"""Position-wise feed-forward blocks: SwiGLU and a plain GELU MLP.

SwiGLU: ``down(silu(gate(x)) * up(x))``.
Reference: Shazeer 2020, GLU Variants Improve Transformer, arXiv:2002.05202.
GELU MLP: ``fc2(gelu(fc1(x)))``, the feed-forward of Vaswani et al. 2017 (arXiv:1706.03762) with
the GELU of Hendrycks and Gimpel 2016 (arXiv:1606.08415).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

HIDDEN_MULTIPLE = 8  # matmul kernels (SIMD lanes on CPU, tensor-core tiles on GPU) like widths in multiples of 8
INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale


def swiglu_hidden_dim(dim: int, mlp_ratio: float, *, multiple_of: int = HIDDEN_MULTIPLE) -> int:
    """Hidden width of a SwiGLU with the parameter count of a GELU MLP of ratio ``mlp_ratio``.

    A SwiGLU has three ``dim x hidden`` matrices where a plain MLP has two, so its hidden width is
    ``2/3 * mlp_ratio * dim`` to keep parameters and FLOPs equal (Shazeer 2020, arXiv:2002.05202).
    The result is rounded up to a multiple of ``multiple_of`` because matmul kernels run fastest
    on widths that fill whole SIMD registers / tensor-core tiles (e.g. 682 -> 688 for dim 256).
    """
    hidden = int(2 * mlp_ratio * dim / 3)
    return multiple_of * math.ceil(hidden / multiple_of)


class SwiGLU(nn.Module):
    """Gated feed-forward ``down_proj(silu(gate) * up)``, gate and up from one fused projection.

    Args:
        dim: token width in and out.
        dim_hidden: width of the gated hidden layer (see ``swiglu_hidden_dim``).
        bias: whether the projections have biases.
        dropout: dropout on the hidden activations during training.
    """

    def __init__(self, dim: int, dim_hidden: int, *, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.dim_hidden = dim_hidden
        # One (dim -> 2 * hidden) matmul instead of two: fewer kernel launches, same maths.
        self.gate_up_proj = nn.Linear(dim, 2 * dim_hidden, bias=bias)
        self.down_proj = nn.Linear(dim_hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def init_weights(self, *, std: float = INIT_STD, out_std: float = INIT_STD) -> None:
        """Truncated-normal weights, zero biases; ``out_std`` for the projection back to the residual."""
        for linear, s in ((self.gate_up_proj, std), (self.down_proj, out_std)):
            nn.init.trunc_normal_(linear.weight, std=s, a=-3 * s, b=3 * s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP to every token.

        Args:
            x: (..., dim).

        Returns:
            (..., dim).
        """
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., 2 * hidden) -> 2 x (..., hidden)
        return self.down_proj(self.dropout(F.silu(gate) * up))


class GeluMLP(nn.Module):
    """Two-layer MLP ``fc2(gelu(fc1(x)))``.

    Args:
        dim: token width in.
        dim_hidden: hidden width.
        dim_out: token width out; ``dim`` when None.
        bias: whether the linear layers have biases.
        dropout: dropout on the hidden activations during training.
    """

    def __init__(
        self, dim: int, dim_hidden: int, dim_out: int | None = None, *, bias: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim_hidden, bias=bias)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(dim_hidden, dim_out if dim_out is not None else dim, bias=bias)

    def init_weights(self, *, std: float = INIT_STD, out_std: float = INIT_STD) -> None:
        """Truncated-normal weights, zero biases; ``out_std`` for ``fc2``."""
        for linear, s in ((self.fc1, std), (self.fc2, out_std)):
            nn.init.trunc_normal_(linear.weight, std=s, a=-3 * s, b=3 * s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to every token.

        Args:
            x: (..., dim).

        Returns:
            (..., dim_out).
        """
        return self.fc2(self.dropout(self.act(self.fc1(x))))
