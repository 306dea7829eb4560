"""Fixed sinusoidal position embeddings: 1-D over a sequence, 2-D over a grid of patches.

References: Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762 (section 3.5); He et
al. 2021, Masked Autoencoders Are Scalable Vision Learners, arXiv:2111.06377 (the 2-D table).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The wavelength ceiling of the original paper: periods range from 2*pi to 10000*2*pi.
SINUSOID_BASE = 10000.0


def sinusoidal_embedding(positions: Tensor, dim: int, *, base: float = SINUSOID_BASE) -> Tensor:
    """Sin/cos features of positions.

    Args:
        positions: (...,) integer or float positions.
        dim: even feature width.

    Returns:
        (..., dim) float32: first half sines, second half cosines.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs  # (..., half)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_2d_embedding(height: int, width: int, dim: int, *, device: torch.device | str | None = None) -> Tensor:
    """Fixed 2-D sin-cos positions of a ``height x width`` grid, row-major.

    The first half of the features is the 1-D sinusoidal embedding of the row index, the second
    half that of the column index (MAE, arXiv:2111.06377), so each axis gets ``dim / 2`` features.

    Args:
        height: grid rows.
        width: grid columns.
        dim: feature width; divisible by 4 (a sine and a cosine half per axis).
        device: where to create the result.

    Returns:
        (height * width, dim) float32; row ``r * width + c`` encodes cell (r, c).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a dim divisible by 4, got {dim}")
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (h*w,) 0 0 .. 1 1 ..
    cols = torch.arange(width, device=device).repeat(height)  # (h*w,) 0 1 .. 0 1 ..
    return torch.cat([sinusoidal_embedding(rows, dim // 2), sinusoidal_embedding(cols, dim // 2)], dim=-1)
