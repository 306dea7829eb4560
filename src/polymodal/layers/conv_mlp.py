"""A feed-forward block for tokens on a grid that also mixes each token with its neighbours: ``fc1``,
then a depthwise k x k convolution over the grid added to the hidden activations, GELU, ``fc2``.

Why: a DiT's patches exchange information only through attention, which a small DiT trained for
a few thousand steps on CPU leaves almost uniform (BENCHMARKS.md, "The flow image head drew
patches on their own"), so each patch of a sample is drawn from its own noise and the image falls
apart into patch-sized fragments. The convolution hands every token its neighbours' hidden
activations in every block, the locality a U-Net has by construction, at the cost of
``k^2 * dim_hidden`` multiply-adds per token (a few percent of the two linear layers). The residual
form ``h + conv(h)`` keeps the plain MLP's per-token path as it is.

References: Wang et al. 2021, PVT v2: Improved Baselines with Pyramid Vision Transformer,
arXiv:2106.13797 (a depthwise 3 x 3 convolution inside the feed-forward); Li et al. 2021,
LocalViT: Bringing Locality to Vision Transformers, arXiv:2104.05707.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.layers.mlp import INIT_STD


class GridConvMLP(nn.Module):
    """``fc2(gelu(h + dwconv(h)))`` with ``h = fc1(x)``, over tokens that fill a row-major grid.

    Args:
        dim: token width in and out.
        dim_hidden: hidden width (the convolution's channels).
        grid: (rows, cols) of the tokens; a sequence must hold exactly rows * cols tokens.
        kernel_size: the convolution's odd side k (zero padding keeps the grid's size).
    """

    def __init__(self, dim: int, dim_hidden: int, grid: tuple[int, int], *, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (the grid keeps its size), got {kernel_size}")
        self.grid = grid
        self.fc1 = nn.Linear(dim, dim_hidden)
        self.conv = nn.Conv2d(dim_hidden, dim_hidden, kernel_size, padding=kernel_size // 2, groups=dim_hidden)
        self.fc2 = nn.Linear(dim_hidden, dim)

    def init_weights(self, *, std: float = INIT_STD, out_std: float = INIT_STD) -> None:
        """As ``GeluMLP``'s for the linear layers; the convolution keeps PyTorch's uniform
        initialisation (bound 1 / k for a depthwise k x k kernel), the one the measurements used."""
        for linear, s in ((self.fc1, std), (self.fc2, out_std)):
            nn.init.trunc_normal_(linear.weight, std=s, a=-3 * s, b=3 * s)
            nn.init.zeros_(linear.bias)
        self.conv.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """(B, rows * cols, dim) -> (B, rows * cols, dim)."""
        rows, cols = self.grid
        if x.shape[1] != rows * cols:
            raise ValueError(f"{x.shape[1]} tokens do not fill the {rows} x {cols} grid")
        hidden = self.fc1(x)  # (B, N, C)
        on_grid = rearrange(hidden, "b (r c) h -> b h r c", r=rows)  # (B, C, rows, cols)
        hidden = hidden + rearrange(self.conv(on_grid), "b h r c -> b (r c) h")
        return self.fc2(F.gelu(hidden))
