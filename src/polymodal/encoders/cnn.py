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
    """Images (B, C, H, W) -> tokens (B, H/2^s * W/2^s, dim) with learned 2-D positions."""

    modality = Modality.IMAGE

    def __init__(self, in_channels: int, image_size: tuple[int, int], *, dim: int = 128, num_stages: int = 3) -> None:
        super().__init__()
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
        self.pos = nn.Parameter(torch.empty(1, self.grid[0] * self.grid[1], dim))
        self.dim_out = dim
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.pos, std=0.02)

    def forward_intermediates(self, images: Tensor) -> EncoderIntermediates:
        hidden = []
        x = images
        for stage in self.stages:
            x = stage(x)
            hidden.append(rearrange(x, "b d h w -> b (h w) d"))
        tokens = hidden[-1] + self.pos  # (B, h*w, dim)
        return EncoderIntermediates(EncoderOutput(tokens), hidden)

    def forward(self, images: Tensor) -> EncoderOutput:
        return self.forward_intermediates(images).output
