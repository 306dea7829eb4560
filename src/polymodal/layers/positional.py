"""Fixed sinusoidal position embeddings.

Reference: Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762 (section 3.5).
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
