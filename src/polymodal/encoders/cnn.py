"""A small convolutional image encoder: strided conv stages, then one token per output cell.

Reference: the ResNet-style stem of He et al. 2015, Deep Residual Learning, arXiv:1512.03385,
kept tiny; each output cell becomes a token (as the CNN variant of seed 002's image encoder).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.modality import Modality


class _ConvStage(nn.Module):
    """Conv(stride 2) -> GroupNorm -> GELU -> Conv -> GroupNorm -> GELU: halves H and W."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        groups = min(8, dim_out)  # GroupNorm is batch-size independent, unlike BatchNorm
        self.body = nn.Sequential(
            nn.Conv2d(dim_in, dim_out, 3, stride=2, padding=1),
            nn.GroupNorm(groups, dim_out),
            nn.GELU(),
            nn.Conv2d(dim_out, dim_out, 3, padding=1),
            nn.GroupNorm(groups, dim_out),
            nn.GELU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@ENCODERS.register("cnn")
class CNNEncoder(nn.Module):
    """Images (B, C, H, W) -> tokens with learned positions: one per output cell (B, h * w, dim),
    or one per output column (B, w, dim), left to right.

    Args:
        dim: token width (and the last stage's channels).
        num_stages: stride-2 stages; the output map is 2^num_stages times smaller.
        tokens: ``cells`` (raster order) or ``columns``: each column's cells concatenated and
            projected, as a CRNN reads a line of text (Shi et al. 2015, arXiv:1507.05717), so the
            token order is the reading order and 1-D rotary positions in the backbone follow it.
        dropout: on the output tokens while training.
    """

    modality = Modality.IMAGE

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        *,
        dim: int = 128,
        num_stages: int = 3,
        tokens: str = "cells",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if tokens not in ("cells", "columns"):
            raise ValueError(f"tokens must be 'cells' or 'columns', got {tokens!r}")
        self.dropout = nn.Dropout(dropout)
        height, width = image_size
        scale = 2**num_stages
        if height % scale or width % scale:
            raise ValueError(f"image size {height}x{width} is not divisible by 2**num_stages={scale}")
        widths = [max(dim // 2 ** (num_stages - 1 - i), 16) for i in range(num_stages)]
        widths[-1] = dim
        self.stages = nn.ModuleList(
            _ConvStage(c_in, c_out) for c_in, c_out in zip([in_channels, *widths[:-1]], widths)
        )
        self.grid = (height // scale, width // scale)
        self.tokens = tokens
        self.columns = nn.Linear(dim * self.grid[0], dim) if tokens == "columns" else None
        num_tokens = self.grid[1] if tokens == "columns" else self.grid[0] * self.grid[1]
        self.pos = nn.Parameter(torch.empty(1, num_tokens, dim))
        self.dim_out = dim
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.pos, std=0.02)

    def forward_intermediates(self, images: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Every stage's cells and the tokens; ``mask`` is accepted like every encoder's and unused
        (images have no padding)."""
        hidden = []
        x = images
        for stage in self.stages:
            x = stage(x)
            hidden.append(rearrange(x, "b d h w -> b (h w) d"))
        if self.columns is not None:
            tokens = self.columns(rearrange(x, "b d h w -> b w (d h)")) + self.pos  # (B, w, dim)
        else:
            tokens = hidden[-1] + self.pos  # (B, h*w, dim)
        return EncoderIntermediates(EncoderOutput(self.dropout(tokens)), hidden)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Images (B, C, H, W) -> EncoderOutput with tokens (B, N, dim); ``mask`` is unused."""
        return self.forward_intermediates(images).output
