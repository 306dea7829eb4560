"""Conditional flow matching on the straight path between noise and data (rectified flow).

With noise x0 ~ N(0, I), data x1 and t ~ U(0, 1), the interpolant is x_t = t x1 + (1 - t) x0 and
the conditional velocity along it is u = x1 - x0; a network v(x_t, t, c) is regressed onto u by
mean squared error. Sampling integrates dx/dt = v from t = 0 (noise) to t = 1 (data)
(``polymodal.decoders.flow_sampling``). This is the convention of torchcfm's
``ConditionalFlowMatcher`` with sigma = 0, which the tests compare against; MetaQuery writes the
same path with s = 1 - t running from data to noise, and velocity e - x0 (its sign flips with s).

Training times. Uniform t spends as many steps near data as near noise, but on a 32 x 96 image the
layout (where each stroke goes) is decided near noise: noise hides a stroke of a few dozen pixels
from each patch only while t is small (at per-pixel signal-to-noise t / (1 - t), summed over a
patch's pixels). SD3 moves training times toward noise for larger images by a shift s:
t' = t / (t + s (1 - t)) in this file's convention (noise at t = 0); s = 1 is no change, s = 3 puts
the median of uniform times at 0.25. Its logit-normal times t = sigmoid(n), n ~ N(0, 1), weight the
middle of the path. ``training_times`` draws either, shifted; the samplers take the same shift for
their time grid (``polymodal.decoders.flow_sampling``).

References: Esser et al. 2024, Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis (SD3), arXiv:2403.03206 (section 3.1 logit-normal times, section 5.3.2 the
resolution-dependent shift). Lipman et al. 2022, Flow Matching for Generative Modeling, arXiv:2210.02747 (the
conditional flow matching objective, eq. 9, with the optimal-transport path, sigma_min = 0); Liu et
al. 2022, Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow,
arXiv:2209.03003 (the straight interpolant and its velocity).
"""

from __future__ import annotations

import torch
from torch import Tensor

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def _per_item(t: Tensor, like: Tensor) -> Tensor:
    """(B,) times -> (B, 1, ..., 1) broadcastable against ``like`` (B, ...)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"need one time per item, (B,) = ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(noise: Tensor, data: Tensor, t: Tensor) -> Tensor:
    """x_t = t data + (1 - t) noise.

    Args:
        noise: (B, ...) the path's start x0; data (B, ...) its end x1.
        t: (B,) in [0, 1].

    Returns:
        (B, ...).
    """
    t = _per_item(t, data)
    return t * data + (1 - t) * noise


def target_velocity(noise: Tensor, data: Tensor) -> Tensor:
    """u = data - noise: the constant velocity along the straight path, (B, ...)."""
    return data - noise


def flow_matching_loss(velocity: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between predicted and target velocities over the real positions.

    Args:
        velocity, target: (B, N, C) (or (B, C, H, W) with ``mask`` None).
        mask: (B, N) True on real positions, or None when every position is real.

    Returns:
        () float32, the mean over every real value; 0 when none is real.
    """
    if velocity.shape != target.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and target {tuple(target.shape)} differ in shape")
    # fp32 island: a mean of many squared errors loses digits in bf16.
    error = (velocity.float() - target.float()).square()
    if mask is None:
        return error.mean()
    if mask.shape != velocity.shape[:2]:
        raise ValueError(f"mask must be (B, N) = {tuple(velocity.shape[:2])}, got {tuple(mask.shape)}")
    error = error.where(mask[:, :, None], 0.0)  # where, not multiply: no NaN leaks in from padding
    return error.sum() / (mask.sum() * velocity.shape[-1]).clamp(min=1)


def shift_times(t: Tensor, shift: float) -> Tensor:
    """Times moved toward noise (t = 0) for ``shift`` > 1: t / (t + shift (1 - t)), elementwise.

    SD3 writes the same map on its noise level sigma = 1 - t as sigma' = shift sigma / (1 + (shift
    - 1) sigma). It fixes 0 and 1, is increasing, and sends 0.5 to 1 / (1 + shift).
    """
    if shift <= 0:
        raise ValueError(f"a time shift must be > 0, got {shift}")
    if shift == 1.0:  # the identity, without the rounding of t / (t + (1 - t))
        return t
    return t / (t + shift * (1 - t))


def training_times(
    n: int, *, distribution: str = "uniform", shift: float = 1.0, device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """``n`` flow times for a training step: uniform or logit-normal (SD3's location 0, scale 1), then
    shifted by ``shift_times``.

    Returns:
        (n,) float32 in [0, 1].
    """
    if distribution == "uniform":
        t = torch.rand(n, device=device, generator=generator)
    elif distribution == "logit_normal":
        t = torch.sigmoid(torch.randn(n, device=device, generator=generator))
    else:
        raise ValueError(f"time distribution {distribution!r} is not valid; valid: {', '.join(TIME_DISTRIBUTIONS)}")
    return shift_times(t, shift)
