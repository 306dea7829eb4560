"""Image tokenizers: autoencoders that turn images into discrete codes (VQ-VAE) or continuous
latents (VAE) and back. Registered in ``IMAGE_TOKENIZERS``; the vector quantizer is a part they share."""

from polymodal.registry import Registry

IMAGE_TOKENIZERS = Registry("image tokenizer")

from polymodal.tokenizers import vae, vqvae  # noqa: E402,F401  (importing registers the parts)
from polymodal.tokenizers.vae import GaussianLatent, VAEOutput, VAETokenizer  # noqa: E402
from polymodal.tokenizers.vector_quantizer import (  # noqa: E402
    QuantizerOutput,
    VectorQuantizer,
    codebook_usage,
    squared_distances,
)
from polymodal.tokenizers.vqvae import VQVAEOutput, VQVAETokenizer, psnr  # noqa: E402

__all__ = [
    "IMAGE_TOKENIZERS",
    "GaussianLatent",
    "QuantizerOutput",
    "VAEOutput",
    "VAETokenizer",
    "VQVAEOutput",
    "VQVAETokenizer",
    "VectorQuantizer",
    "codebook_usage",
    "psnr",
    "squared_distances",
]
