"""KL divergence of a diagonal Gaussian posterior from the standard normal prior (the VAE's KL term).

Reference: Kingma and Welling 2013, Auto-Encoding Variational Bayes, arXiv:1312.6114 (appendix B:
``-KL = 1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2)``).
"""

from __future__ import annotations

from torch import Tensor


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per item, summed over every latent element.

    Args:
        mean: (B, ...) posterior means.
        logvar: (B, ...) posterior log-variances, same shape as ``mean``.

    Returns:
        (B,) KL in nats of each item.
    """
    if mean.shape != logvar.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have one shape")
    # fp32 island: exp of a bf16 log-variance loses most of its digits.
    mean, logvar = mean.float(), logvar.float()
    per_element = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (B, ...)
    return per_element.flatten(1).sum(dim=1)  # (B, ...) -> (B,)
