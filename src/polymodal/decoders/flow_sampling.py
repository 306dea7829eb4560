"""Sampling a flow-matching model: integrate dx/dt = v(x, t) from noise at t = 0 to data at t = 1
with a fixed number of steps, by Euler or by Heun's second-order method, with classifier-free
guidance folded into the velocity.

Heun's method (the explicit trapezoid rule) evaluates the velocity twice per step, so ``steps``
Heun steps cost ``2 * steps`` evaluations against Euler's ``steps``; its error falls with the
square of the step. Karras et al. 2022 (arXiv:2206.00364, algorithm 1) skip the correction on the
last step because their ODE is singular at noise level zero; the flow's velocity is defined at
t = 1, so every step here is corrected. On the straight paths of rectified flow few steps
suffice (Liu et al. 2022, arXiv:2209.03003).

The time grid is uniform, or moved toward noise by SD3's shift (``losses/flow_matching.py``
``shift_times``; Esser et al. 2024, arXiv:2403.03206), which gives the steps where the image's
layout is decided (small t) more of the budget. SD3 samples with the shift it trained with; the
flow image heads keep the two apart (``heads/flow_image.py`` says why).

Classifier-free guidance (Ho and Salimans 2022, arXiv:2207.12598): v = v_u + w (v_c - v_u) with
v_u the velocity under the empty condition; w = 1 is the conditional model alone. A condition with
padded tokens (a source of varying length) comes with its mask, and so does the empty one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from polymodal.losses.flow_matching import shift_times

SAMPLERS = ("euler", "heun")
# A velocity function: (x (B, ...), t (B,)) -> (B, ...).
Velocity = Callable[[Tensor, Tensor], Tensor]


def guided(
    velocity: Callable[..., Tensor], condition: Tensor, empty: Tensor | None, scale: float, *, mask: Tensor | None = None,
    empty_mask: Tensor | None = None,
) -> Velocity:  # fmt: skip
    """The velocity under classifier-free guidance of ``scale``: the conditional and the empty
    condition's velocities from one batched call of ``velocity(x, t, condition[, mask])``.

    Args:
        velocity: the network, (x (B, ...), t (B,), condition (B, Nc, ...)) -> (B, ...), called
            with a fourth argument, the condition's mask (B, Nc), when masks are given.
        condition: (B, Nc, ...) each item's condition; empty (1 or B, Nc, ...) the empty one, or None.
        scale: w; 1 (or no ``empty``) is the conditional velocity alone, one call per step.
        mask: (B, Nc) True on the real tokens of ``condition``; empty_mask (1 or B, Nc) those of
            ``empty``. Both or neither (every token real).
    """
    if (mask is None) != (empty_mask is None) and empty is not None:
        raise ValueError("give the condition's mask and the empty condition's mask together, or neither")

    def call(x: Tensor, t: Tensor, tokens: Tensor, real: Tensor | None) -> Tensor:
        return velocity(x, t, tokens) if real is None else velocity(x, t, tokens, real)

    if empty is None or scale == 1.0:
        return lambda x, t: call(x, t, condition, mask)
    both_conditions = torch.cat([condition, empty.expand_as(condition)])  # (2B, Nc, ...)
    both_masks = None if mask is None else torch.cat([mask, empty_mask.expand_as(mask)])  # (2B, Nc)

    def guided_velocity(x: Tensor, t: Tensor) -> Tensor:
        both = call(torch.cat([x, x]), torch.cat([t, t]), both_conditions, both_masks)  # (2B, ...)
        conditional, unconditional = both.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided_velocity


def evaluations(sampler: str, steps: int) -> int:
    """Velocity evaluations a sample costs (each doubled by guidance)."""
    return steps if sampler == "euler" else 2 * steps


@torch.no_grad()
def integrate(velocity: Velocity, noise: Tensor, *, steps: int, sampler: str = "heun", shift: float = 1.0) -> Tensor:
    """x at t = 1 from x = ``noise`` at t = 0, in ``steps`` steps on a uniform grid moved by ``shift``.

    Args:
        velocity: v(x, t) with x (B, ...) and t (B,).
        noise: (B, ...) the start.
        steps: >= 1.
        sampler: ``euler`` or ``heun``.
        shift: the grid is ``shift_times(linspace(0, 1, steps + 1), shift)``; 1 keeps it uniform.

    Returns:
        (B, ...) the end point.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not valid; valid: {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise
    times = shift_times(torch.linspace(0.0, 1.0, steps + 1, device=noise.device), shift)  # (steps + 1,) from 0 to 1
    for start, end in zip(times[:-1], times[1:]):
        t = start.expand(x.shape[0])  # (B,)
        slope = velocity(x, t)
        moved = x + (end - start) * slope
        if sampler == "heun":
            x = x + (end - start) * 0.5 * (slope + velocity(moved, end.expand(x.shape[0])))
        else:
            x = moved
    return x
