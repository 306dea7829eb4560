"""Rotary position embedding (RoPE).

Feature pairs of queries and keys are rotated by an angle proportional to the token's position, so
the query-key dot product depends on positions only through their difference. Pairs are formed
half-split (feature ``k`` with feature ``k + head_dim/2``), as in GPT-NeoX and Llama.

Reference: Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding,
arXiv:2104.09864.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

DEFAULT_BASE = 10000.0  # RoFormer's wavelength base


@dataclasses.dataclass(frozen=True)
class RotaryAngles:
    """Cosines and sines of the rotation angles for a set of positions, computed once per forward.

    Attributes:
        cos: (B, 1, N, head_dim / 2), float32 (or float64).
        sin: (B, 1, N, head_dim / 2), float32 (or float64).
    """

    cos: Tensor
    sin: Tensor

    def rotate(self, x: Tensor) -> Tensor:
        """Rotate queries or keys.

        Args:
            x: (B, H, N, head_dim).

        Returns:
            (B, H, N, head_dim), in the dtype of ``x``.
        """
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)  # keep q/k in the autocast dtype
        x1, x2 = x.chunk(2, dim=-1)  # (B, H, N, head_dim/2) each: real and imaginary parts
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """Turns token positions into rotation angles for ``head_dim``-wide heads.

    Holds no parameters or buffers (the frequencies are recomputed from ``head_dim`` and ``base``
    on the positions' device), so it builds on the meta device and needs no initialisation.

    Args:
        head_dim: width of one attention head; must be even.
        base: wavelength base; frequency k is ``base ** (-2k / head_dim)``.
    """

    def __init__(self, head_dim: int, *, base: float = DEFAULT_BASE) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.base = base

    def inverse_frequencies(self, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """(head_dim / 2,) angular frequencies."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=dtype) / self.head_dim
        return self.base**-exponents

    def forward(self, positions: Tensor, *, dtype: torch.dtype = torch.float32) -> RotaryAngles:
        """Angles for integer positions.

        Args:
            positions: (B, N) integer positions.
            dtype: float32, or float64 for float64 models (never lower, see below).

        Returns:
            RotaryAngles with cos and sin of shape (B, 1, N, head_dim / 2).
        """
        # fp32 island: position * frequency reaches thousands of radians; bf16 would lose the phase.
        dtype = torch.promote_types(dtype, torch.float32)
        inverse_frequencies = self.inverse_frequencies(positions.device, dtype)  # (hd/2,)
        angles = positions.to(dtype)[:, None, :, None] * inverse_frequencies  # (B, 1, N, hd/2)
        return RotaryAngles(cos=angles.cos(), sin=angles.sin())

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
