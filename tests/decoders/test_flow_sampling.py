"""The flow samplers on velocity fields with known solutions: exact where the method must be,
first- and second-order convergence otherwise; classifier-free guidance batched against two calls."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.decoders.flow_sampling import evaluations, guided, integrate


def test_a_constant_velocity_is_integrated_exactly_by_both():
    start = torch.randn(4, 3)
    drift = torch.randn(4, 3)
    for sampler in ("euler", "heun"):
        end = integrate(lambda x, t: drift, start, steps=3, sampler=sampler)
        torch.testing.assert_close(end, start + drift)


def test_heun_is_exact_for_a_velocity_linear_in_time():
    # v = 2 t c: x(1) = x0 + c. The trapezoid rule integrates a linear function exactly; Euler does not.
    start, c = torch.randn(2, 5), torch.randn(2, 5)
    velocity = lambda x, t: 2 * t[:, None] * c  # noqa: E731
    torch.testing.assert_close(integrate(velocity, start, steps=4, sampler="heun"), start + c)
    assert not torch.allclose(integrate(velocity, start, steps=4, sampler="euler"), start + c, atol=1e-3)


def test_convergence_orders_on_exponential_growth():
    # dx/dt = x: x(1) = e x0. Euler's error halves with twice the steps, Heun's quarters.
    start = torch.ones(1, 1, dtype=torch.float64)
    errors = {}
    for sampler in ("euler", "heun"):
        errors[sampler] = [abs(float(integrate(lambda x, t: x, start, steps=n, sampler=sampler)) - math.e) for n in (16, 32)]
    assert 1.8 < errors["euler"][0] / errors["euler"][1] < 2.2
    assert 3.6 < errors["heun"][0] / errors["heun"][1] < 4.4
    assert errors["heun"][1] < errors["euler"][1] / 10


def test_evaluation_count():
    for sampler, steps in (("euler", 5), ("heun", 5), ("heun", 1)):
        calls = []
        integrate(lambda x, t: calls.append(1) or x, torch.zeros(1, 2), steps=steps, sampler=sampler)
        assert len(calls) == evaluations(sampler, steps)


def test_guidance_batched_equals_the_formula():
    torch.manual_seed(0)
    weights = torch.randn(3, 3)

    def velocity(x, t, condition):  # any function of all three
        return torch.tanh(x @ weights + condition * t[:, None])

    x, t = torch.randn(4, 3), torch.rand(4)
    condition, empty = torch.randn(4, 3), torch.randn(1, 3)
    conditional, unconditional = velocity(x, t, condition), velocity(x, t, empty.expand(4, 3))
    torch.testing.assert_close(guided(velocity, condition, empty, 3.0)(x, t), unconditional + 3.0 * (conditional - unconditional))
    torch.testing.assert_close(guided(velocity, condition, empty, 1.0)(x, t), conditional)
    torch.testing.assert_close(guided(velocity, condition, None, 3.0)(x, t), conditional)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sampler 'rk4' is not valid; valid: euler, heun"):
        integrate(lambda x, t: x, torch.zeros(1), steps=2, sampler="rk4")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        integrate(lambda x, t: x, torch.zeros(1), steps=0)
