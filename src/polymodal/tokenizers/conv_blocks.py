"""Convolutional encoder and decoder stacks (strided convolutions + residual blocks) shared by the
image tokenizers.

Reference: van den Oord et al. 2017, Neural Discrete Representation Learning, arXiv:1711.00937
(section 4.1: two stride-2 4x4 convolutions, then residual blocks ReLU-3x3-ReLU-1x1; the decoder
mirrors it with transposed convolutions).
"""

from __future__ import annotations

from torch import Tensor, nn

# 4x4 kernels with stride 2 and padding 1 halve (or, transposed, double) height and width exactly.
_DOWN_KERNEL, _STRIDE, _PADDING = 4, 2, 1
# The residual blocks' inner 3x3 convolution is this many times narrower than the stack (the
# reference VQ-VAE uses 128 channels with 32 residual hiddens); it halves their cost on CPU.
_RES_HIDDEN_DIVISOR = 2


def level_widths(channels: int, num_downsamples: int) -> list[int]:
    """Channels after each stride-2 stage, finest first: halved per level above the lowest, where
    ``channels`` is used (most of the work happens at the coarse levels, which have fewer pixels).

    >>> level_widths(64, 3)
    [16, 32, 64]
    """
    return [max(channels // 2 ** (num_downsamples - 1 - i), 1) for i in range(num_downsamples)]


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``: keeps channels and resolution.

    Args:
        channels: input and output channels.
        hidden_channels: channels of the inner 3x3 convolution; None uses ``channels``.
    """

    def __init__(self, channels: int, *, hidden_channels: int | None = None) -> None:
        super().__init__()
        hidden = hidden_channels or channels
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))  # (B, C, H, W) -> (B, C, H, W)


class ConvEncoder(nn.Module):
    """Images to a latent map ``2**num_downsamples`` times smaller in height and width.

    Args:
        in_channels: image channels C.
        out_channels: latent channels.
        channels: width at the lowest resolution (halved per level above, see ``level_widths``).
        num_downsamples: number of stride-2 convolutions (0 keeps the resolution).
        num_res_blocks: residual blocks at the lowest resolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, channels: int, num_downsamples: int, num_res_blocks: int
    ) -> None:
        super().__init__()
        if num_downsamples < 0 or num_res_blocks < 0 or channels < 1:
            raise ValueError(
                f"need channels >= 1, num_downsamples >= 0 and num_res_blocks >= 0, got "
                f"{channels}, {num_downsamples}, {num_res_blocks}"
            )
        layers: list[nn.Module] = []
        width = in_channels
        for level_width in level_widths(channels, num_downsamples):
            layers += [nn.Conv2d(width, level_width, _DOWN_KERNEL, stride=_STRIDE, padding=_PADDING), nn.ReLU()]
            width = level_width
        layers.append(nn.Conv2d(width, channels, kernel_size=3, padding=1))
        hidden = max(channels // _RES_HIDDEN_DIVISOR, 1)
        layers += [ResidualBlock(channels, hidden_channels=hidden) for _ in range(num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(channels, out_channels, kernel_size=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)  # (B, C, H, W) -> (B, out_channels, H / 2**n, W / 2**n)


class ConvDecoder(nn.Module):
    """A latent map back to images ``2**num_downsamples`` times larger; mirrors ``ConvEncoder``.

    The output is linear (no tanh), so values saturating at -1 (the background) are reachable.

    Args:
        in_channels: latent channels.
        out_channels: image channels C.
        channels: width at the lowest resolution (halved per level above, see ``level_widths``).
        num_downsamples: number of stride-2 transposed convolutions (the encoder's downsamples).
        num_res_blocks: residual blocks at the lowest resolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, channels: int, num_downsamples: int, num_res_blocks: int
    ) -> None:
        super().__init__()
        if num_downsamples < 0 or num_res_blocks < 0 or channels < 1:
            raise ValueError(
                f"need channels >= 1, num_downsamples >= 0 and num_res_blocks >= 0, got "
                f"{channels}, {num_downsamples}, {num_res_blocks}"
            )
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)]
        hidden = max(channels // _RES_HIDDEN_DIVISOR, 1)
        layers += [ResidualBlock(channels, hidden_channels=hidden) for _ in range(num_res_blocks)]
        layers.append(nn.ReLU())
        # Coarse to fine: each transposed convolution doubles the resolution and narrows to the
        # width the encoder had one level up (the image channels at the last one).
        widths = level_widths(channels, num_downsamples)[::-1][1:] + [out_channels] if num_downsamples else []
        width = channels
        for i, level_width in enumerate(widths):
            layers.append(nn.ConvTranspose2d(width, level_width, _DOWN_KERNEL, stride=_STRIDE, padding=_PADDING))
            if i < num_downsamples - 1:
                layers.append(nn.ReLU())
            width = level_width
        if num_downsamples == 0:
            layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, latents: Tensor) -> Tensor:
        return self.layers(latents)  # (B, in_channels, h, w) -> (B, C, h * 2**n, w * 2**n)


def check_images(images: Tensor, in_channels: int, factor: int) -> None:
    """Raise a ValueError naming the problem unless ``images`` is (B, in_channels, H, W) with H and W
    divisible by ``factor`` (the tokenizer's downsampling)."""
    if images.ndim != 4 or images.shape[1] != in_channels:
        raise ValueError(f"expected images of shape (B, {in_channels}, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(
            f"image height and width ({height}, {width}) must be divisible by the downsampling factor {factor}"
        )
