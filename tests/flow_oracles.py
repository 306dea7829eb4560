"""The exact velocity field of flow matching when the data is a mixture of isotropic Gaussians, as a
dense reference for the samplers and the flow heads (importable as ``from flow_oracles import ...``).

With noise x0 ~ N(0, I), data x1 ~ sum_k w_k N(mu_k, s^2 I) and x_t = t x1 + (1 - t) x0, the field
the flow-matching loss is least at is v(x, t) = E[x1 - x0 | x_t = x]. Given component k, x_t is
N(t mu_k, c^2 I) with c^2 = t^2 s^2 + (1 - t)^2, and (x1, x0, x_t) are jointly Gaussian, so
E[x1 - x0 | x_t = x, k] = mu_k + (t s^2 - (1 - t)) / c^2 (x - t mu_k); the mixture weights each
component by its posterior given x (Lipman et al. 2022, arXiv:2210.02747, the marginal field of
eq. 8). The sampler must carry noise at t = 0 to the data at t = 1 under it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mixture_velocity(means: Tensor, weights: Tensor, spread: float):
    """The exact field v(x, t) for data ``sum_k weights[k] N(means[k], spread^2 I)``.

    Args:
        means: (K, ...) the components' means, each the shape of one item.
        weights: (K,) mixture weights summing to one.
        spread: s > 0, every component's standard deviation per value.

    Returns:
        A function (x (B, ...), t (B,)) -> (B, ...) in x's dtype, computed in float64.
    """
    mu = means.reshape(len(means), -1).double()  # (K, D)
    log_weights = weights.double().log()  # (K,)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        flat = x.reshape(len(x), -1).double()  # (B, D)
        time = t.double()[:, None, None]  # (B, 1, 1)
        variance = time**2 * spread**2 + (1 - time) ** 2  # (B, 1, 1)
        centred = flat[:, None, :] - time * mu[None]  # (B, K, D)
        log_density = -0.5 * centred.square().sum(-1) / variance[..., 0] - 0.5 * mu.shape[1] * variance[..., 0].log()  # (B, K)
        posterior = (log_weights + log_density).softmax(dim=-1)  # (B, K)
        per_component = mu[None] + (time * spread**2 - (1 - time)) / variance * centred  # (B, K, D)
        return (posterior[..., None] * per_component).sum(1).reshape(x.shape).to(x.dtype)

    return velocity


def sample_mixture(means: Tensor, weights: Tensor, spread: float, count: int, generator: torch.Generator) -> Tensor:
    """(count, ...) draws of the mixture, float64."""
    picks = torch.multinomial(weights.double(), count, replacement=True, generator=generator)  # (count,)
    noise = torch.randn((count, *means.shape[1:]), generator=generator, dtype=torch.float64)
    return means.double()[picks] + spread * noise


def nearest(points: Tensor, means: Tensor) -> tuple[Tensor, Tensor]:
    """Each point's nearest mean and its distance per value (RMS): (B,) long, (B,) float."""
    distances = torch.cdist(points.reshape(len(points), -1).double(), means.reshape(len(means), -1).double())  # (B, K)
    closest, which = distances.min(dim=1)
    return which, closest / math.sqrt(points[0].numel())
