"""VQ-VAE image tokenizer: convolutional encoder, vector quantizer, convolutional decoder.

Reference: van den Oord et al. 2017, Neural Discrete Representation Learning, arXiv:1711.00937.
The codes of an image (a ``(h, w)`` grid of indices) are the image tokens that an autoregressive
model generates; ``decode`` turns them back into pixels.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.models.output import StepOutput
from polymodal.tokenizers import IMAGE_TOKENIZERS
from polymodal.tokenizers.conv_blocks import ConvDecoder, ConvEncoder, check_images
from polymodal.tokenizers.vector_quantizer import DEFAULT_DEAD_THRESHOLD, VectorQuantizer

# A perfect reconstruction has infinite PSNR; the MSE is floored here (100 dB) to keep means finite.
_MIN_MSE = 1e-10


def psnr(reconstructions: Tensor, images: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of each image, with pixels in [-1, 1] mapped to [0, 1].

    Reconstructions are clamped to [-1, 1] first, as they would be when shown.

    Args:
        reconstructions: (B, C, H, W) in [-1, 1] (values outside are clamped).
        images: (B, C, H, W) in [-1, 1].

    Returns:
        (B,) float64 PSNR in dB: ``10 log10(1 / mse)`` on the [0, 1] scale.
    """
    if reconstructions.shape != images.shape:
        raise ValueError(f"shapes differ: {tuple(reconstructions.shape)} vs {tuple(images.shape)}")
    # Diagnostics in float64. Mapping [-1, 1] -> [0, 1] halves errors: mse_01 = mse_pm1 / 4.
    diff = (reconstructions.detach().double().clamp(-1.0, 1.0) - images.detach().double()) / 2.0
    mse = diff.square().flatten(1).mean(dim=1).clamp(min=_MIN_MSE)  # (B, C, H, W) -> (B,)
    return -10.0 * torch.log10(mse)


@dataclasses.dataclass(frozen=True)
class VQVAEOutput:
    """One pass of a ``VQVAETokenizer``.

    Attributes:
        reconstructions: (B, C, H, W) decoded images.
        indices: (B, h, w) long code of each latent position.
        losses: unweighted terms: ``reconstruction`` (pixel MSE), ``commitment``, and ``codebook``
            when the codebook learns by gradient.
        stats: detached scalars: ``perplexity``, ``code_usage``, ``dead_restarted`` (this batch).
    """

    reconstructions: Tensor
    indices: Tensor
    losses: dict[str, Tensor]
    stats: dict[str, Tensor]


@IMAGE_TOKENIZERS.register("vqvae")
class VQVAETokenizer(nn.Module):
    """Images <-> grids of discrete codes.

    Args:
        in_channels: image channels C.
        channels: width of the encoder's and decoder's hidden layers.
        num_downsamples: stride-2 stages; the code grid is ``2**num_downsamples`` times smaller.
        num_res_blocks: residual blocks at the lowest resolution, in encoder and decoder each.
        dim: channels of the latent map the quantizer sees.
        num_codes: K, the codebook size (the image-token vocabulary).
        code_dim: width of the code space; None uses ``dim`` (see ``VectorQuantizer``).
        ema: update the codebook by EMA (no ``codebook`` loss) instead of by gradient.
        decay: EMA decay of the codebook statistics and usage counts.
        eps: Laplace smoothing of the EMA counts.
        cosine: l2-normalised codes and cosine lookup.
        restart_dead: restart codes whose usage falls below ``dead_threshold``.
        dead_threshold: usage count (vectors per step, EMA) under which a code is dead.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: int = 64,
        num_downsamples: int = 2,
        num_res_blocks: int = 2,
        dim: int = 64,
        num_codes: int = 512,
        code_dim: int | None = None,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        cosine: bool = False,
        restart_dead: bool = True,
        dead_threshold: float = DEFAULT_DEAD_THRESHOLD,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_codes = num_codes
        self.downsample_factor = 2**num_downsamples
        stack = dict(channels=channels, num_downsamples=num_downsamples, num_res_blocks=num_res_blocks)
        self.encoder = ConvEncoder(in_channels, dim, **stack)
        self.quantizer = VectorQuantizer(
            dim,
            num_codes=num_codes,
            code_dim=code_dim,
            ema=ema,
            decay=decay,
            eps=eps,
            cosine=cosine,
            restart_dead=restart_dead,
            dead_threshold=dead_threshold,
        )
        self.decoder = ConvDecoder(dim, in_channels, **stack)

    def init_weights(self) -> None:
        """Re-initialise every layer and the codebook."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                module.reset_parameters()
        self.quantizer.init_weights()

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the code grid for images of ``height`` x ``width``."""
        probe = torch.empty(1, self.in_channels, height, width, device="meta")
        check_images(probe, self.in_channels, self.downsample_factor)
        return height // self.downsample_factor, width // self.downsample_factor

    def forward(self, images: Tensor) -> VQVAEOutput:
        """Encode, quantize (updating the codebook in training mode) and decode.

        Args:
            images: (B, C, H, W) in [-1, 1], H and W divisible by ``downsample_factor``.
        """
        check_images(images, self.in_channels, self.downsample_factor)
        latents = self.encoder(images)  # (B, C, H, W) -> (B, dim, h, w)
        quant = self.quantizer(rearrange(latents, "b d h w -> b h w d"))
        quantized = rearrange(quant.quantized, "b h w d -> b d h w")
        reconstructions = self.decoder(quantized)  # (B, dim, h, w) -> (B, C, H, W)
        losses = {"reconstruction": F.mse_loss(reconstructions.float(), images.float()), **quant.losses}
        return VQVAEOutput(reconstructions=reconstructions, indices=quant.indices, losses=losses, stats=quant.stats)

    def training_step(self, images: Tensor) -> StepOutput:
        """One forward pass for the training loop.

        Args:
            images: (B, C, H, W) float in [-1, 1].

        Returns:
            ``StepOutput`` with unweighted losses ``reconstruction``, ``commitment`` (and
            ``codebook`` without EMA) and metrics ``psnr``, ``perplexity``, ``code_usage``,
            ``dead_restarted``. The paper's beta is ``train.loss_weights.commitment``.
        """
        out = self(images)
        metrics = {"psnr": float(psnr(out.reconstructions, images).mean())}
        metrics.update({name: float(value) for name, value in out.stats.items()})
        return StepOutput(losses=out.losses, metrics=metrics)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images to code indices, with no state change.

        Args:
            images: (B, C, H, W) in [-1, 1].

        Returns:
            (B, h, w) long indices in [0, num_codes).
        """
        check_images(images, self.in_channels, self.downsample_factor)
        latents = self.encoder(images)  # (B, C, H, W) -> (B, dim, h, w)
        return self.quantizer.encode(rearrange(latents, "b d h w -> b h w d"))  # -> (B, h, w)

    def decode(self, indices: Tensor) -> Tensor:
        """Code indices to images.

        Args:
            indices: (B, h, w) long indices in [0, num_codes).

        Returns:
            (B, C, h * factor, w * factor) images (roughly in [-1, 1]; not clamped).
        """
        if indices.ndim != 3:
            raise ValueError(f"expected indices of shape (B, h, w), got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            low, high = int(indices.min()), int(indices.max())
            raise ValueError(f"indices must lie in [0, {self.num_codes}), got [{low}, {high}]")
        codes = self.quantizer.decode_indices(indices)  # (B, h, w) -> (B, h, w, dim)
        return self.decoder(rearrange(codes, "b h w d -> b d h w"))  # -> (B, C, H, W)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(encode(images))``: (B, C, H, W) -> (B, C, H, W), with no state change."""
        return self.decode(self.encode(images))
