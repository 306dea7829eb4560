"""VAE image tokenizer: the continuous sibling of the VQ-VAE (diagonal Gaussian latent map).

References: Kingma and Welling 2013, Auto-Encoding Variational Bayes, arXiv:1312.6114
(reparameterisation ``z = mean + sigma * noise`` and the KL term to a standard normal prior);
Rombach et al. 2021, latent diffusion, arXiv:2112.10752 (a generator on the latents divided by
their overall standard deviation, ``latent_scale``).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.losses.kl import gaussian_kl
from polymodal.models.output import StepOutput
from polymodal.tokenizers import IMAGE_TOKENIZERS
from polymodal.tokenizers.conv_blocks import ConvDecoder, ConvEncoder, check_images
from polymodal.tokenizers.vqvae import psnr

# Log-variances are clamped here so exp() neither overflows nor collapses to 0 early in training.
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class GaussianLatent:
    """A diagonal Gaussian posterior over a latent map.

    Attributes:
        mean: (B, dim, h, w).
        logvar: (B, dim, h, w) log-variance.
    """

    mean: Tensor
    logvar: Tensor

    def sample(self) -> Tensor:
        """Reparameterised sample ``mean + exp(logvar / 2) * noise``: (B, dim, h, w), differentiable."""
        return self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean)


@dataclasses.dataclass(frozen=True)
class VAEOutput:
    """One pass of a ``VAETokenizer``.

    Attributes:
        reconstructions: (B, C, H, W) decoded images.
        latent: the posterior (mean and log-variance, (B, dim, h, w) each).
        losses: unweighted ``reconstruction`` (pixel MSE) and ``kl`` (nats per image element:
            KL of an image divided by C*H*W, so a weight of 1 is a Gaussian likelihood of variance 1/2).
    """

    reconstructions: Tensor
    latent: GaussianLatent
    losses: dict[str, Tensor]


def measure_latent_scale(latents: Tensor) -> Tensor:
    """Latent diffusion's scale: the standard deviation of every element of a batch of latents, so
    that ``latents / latent_scale`` has about unit spread like a flow's noise.

    Args:
        latents: (B, dim, h, w) latents (posterior means) of a batch of images.

    Returns:
        () float64 standard deviation, > 0.
    """
    if latents.numel() < 2:
        raise ValueError(f"measure_latent_scale needs a batch of latents (at least 2 elements), got shape {tuple(latents.shape)}")
    # float64: a diagnostic-like reduction over every element of the batch.
    scale = latents.detach().double().flatten().std()
    if not torch.isfinite(scale) or scale <= 0:
        raise ValueError(f"latents' standard deviation is {scale.item()}; the VAE's latents are constant or not finite")
    return scale


@IMAGE_TOKENIZERS.register("vae")
class VAETokenizer(nn.Module):
    """Images <-> continuous latent maps ``2**num_downsamples`` times smaller.

    Args:
        in_channels: image channels C.
        channels: width of the encoder's and decoder's hidden layers.
        num_downsamples: stride-2 stages.
        num_res_blocks: residual blocks at the lowest resolution, in encoder and decoder each.
        dim: latent channels.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: int = 64,
        num_downsamples: int = 2,
        num_res_blocks: int = 2,
        dim: int = 8,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.dim = dim
        self.downsample_factor = 2**num_downsamples
        stack = dict(channels=channels, num_downsamples=num_downsamples, num_res_blocks=num_res_blocks)
        self.encoder = ConvEncoder(in_channels, 2 * dim, **stack)  # mean and log-variance
        self.decoder = ConvDecoder(dim, in_channels, **stack)

    def init_weights(self) -> None:
        """Re-initialise every layer."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.reset_parameters()

    def posterior(self, images: Tensor) -> GaussianLatent:
        """The Gaussian posterior of each image: (B, C, H, W) -> mean, logvar (B, dim, h, w)."""
        check_images(images, self.in_channels, self.downsample_factor)
        moments = self.encoder(images)  # (B, C, H, W) -> (B, 2 * dim, h, w)
        mean, logvar = moments.chunk(2, dim=1)  # -> (B, dim, h, w) each
        return GaussianLatent(mean=mean, logvar=logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX))

    def forward(self, images: Tensor) -> VAEOutput:
        """Encode, sample (the mean outside training), decode.

        Args:
            images: (B, C, H, W) in [-1, 1], H and W divisible by ``downsample_factor``.
        """
        latent = self.posterior(images)
        latents = latent.sample() if self.training else latent.mean
        reconstructions = self.decoder(latents)  # (B, dim, h, w) -> (B, C, H, W)
        pixels_per_image = images[0].numel()
        losses = {
            "reconstruction": F.mse_loss(reconstructions.float(), images.float()),
            "kl": gaussian_kl(latent.mean, latent.logvar).mean() / pixels_per_image,
        }
        return VAEOutput(reconstructions=reconstructions, latent=latent, losses=losses)

    def training_step(self, images: Tensor) -> StepOutput:
        """One forward pass for the training loop.

        Args:
            images: (B, C, H, W) float in [-1, 1].

        Returns:
            ``StepOutput`` with unweighted losses ``reconstruction`` and ``kl`` and metrics ``psnr``
            and ``kl_nats`` (KL per image).
        """
        out = self(images)
        metrics = {
            "psnr": float(psnr(out.reconstructions, images).mean()),
            "kl_nats": float(out.losses["kl"].detach()) * images[0].numel(),
        }
        return StepOutput(losses=out.losses, metrics=metrics)

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False) -> Tensor:
        """Images to latents: the posterior mean, or a sample of it.

        Args:
            images: (B, C, H, W) in [-1, 1].
            sample: draw from the posterior instead of taking its mean.

        Returns:
            (B, dim, h, w) latents.
        """
        latent = self.posterior(images)
        return latent.sample() if sample else latent.mean

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to images: (B, dim, h, w) -> (B, C, h * factor, w * factor)."""
        if latents.ndim != 4 or latents.shape[1] != self.dim:
            raise ValueError(f"expected latents of shape (B, {self.dim}, h, w), got {tuple(latents.shape)}")
        return self.decoder(latents)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """``decode(encode(images))`` through the posterior mean: (B, C, H, W) -> (B, C, H, W)."""
        return self.decode(self.encode(images))
