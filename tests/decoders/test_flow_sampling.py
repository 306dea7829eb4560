"""The flow samplers on velocity fields with known solutions: exact where the method must be,
first- and second-order convergence otherwise; classifier-free guidance batched against two calls;
under the exact field of a Gaussian mixture (``flow_oracles``) both carry noise to the data, and the
training loss is least at that field in the convention the samplers integrate."""

from __future__ import annotations

import math

import pytest
import torch
from flow_oracles import mixture_velocity, nearest, sample_mixture

from polymodal.decoders.flow_sampling import evaluations, guided, integrate
from polymodal.losses.flow_matching import flow_matching_loss, interpolate, shift_times, target_velocity

# Two components in 6 dimensions, far apart against their spread, in unequal shares.
MEANS = torch.tensor([[2.0, -1.0, 0.0, 1.5, -2.0, 0.5], [-1.5, 2.0, 1.0, -2.0, 0.0, -1.0]])
WEIGHTS = torch.tensor([0.25, 0.75])
SPREAD = 0.2


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


def test_guidance_passes_each_conditions_mask():
    def velocity(x, t, condition, mask):  # the masked mean of the condition tokens, moved by x
        return x + (condition * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    x, t = torch.randn(2, 3), torch.rand(2)
    condition, mask = torch.randn(2, 4, 3), torch.tensor([[True, True, False, False], [True, True, True, True]])
    empty, empty_mask = torch.randn(1, 4, 3), torch.tensor([[False, False, False, True]])
    conditional, unconditional = velocity(x, t, condition, mask), velocity(x, t, empty.expand(2, 4, 3), empty_mask.expand(2, 4))
    field = guided(velocity, condition, empty, 2.0, mask=mask, empty_mask=empty_mask)
    torch.testing.assert_close(field(x, t), unconditional + 2.0 * (conditional - unconditional))
    torch.testing.assert_close(guided(velocity, condition, empty, 1.0, mask=mask, empty_mask=empty_mask)(x, t), conditional)
    with pytest.raises(ValueError, match="mask together"):
        guided(velocity, condition, empty, 2.0, mask=mask)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="sampler 'rk4' is not valid; valid: euler, heun"):
        integrate(lambda x, t: x, torch.zeros(1), steps=2, sampler="rk4")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        integrate(lambda x, t: x, torch.zeros(1), steps=0)


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 64), ("heun", 32)])
def test_the_exact_field_carries_noise_to_the_data(sampler, steps):
    # Noise at t = 0, data at t = 1: each end point lies on a component, in the mixture's shares
    # and with its spread. A reversed time or velocity sign lands nowhere near either mean.
    noise = torch.randn(4000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ends = integrate(mixture_velocity(MEANS, WEIGHTS, SPREAD), noise, steps=steps, sampler=sampler)
    which, distance = nearest(ends, MEANS)
    assert distance.max() < 4 * SPREAD
    assert abs(which.double().mean().item() - WEIGHTS[1].item()) < 0.03
    spread = (ends - MEANS.double()[which]).std().item()
    assert abs(spread / SPREAD - 1) < 0.1


def test_a_shifted_grid_visits_the_shifted_times_and_still_reaches_the_data():
    # The velocity is asked at the grid's times (Heun: each step's start and end), which are
    # shift_times of the uniform grid; under the exact field the shifted grid lands on the data too.
    seen = []
    integrate(lambda x, t: seen.append(t[0].item()) or x, torch.zeros(1, 2), steps=4, sampler="euler", shift=3.0)
    torch.testing.assert_close(torch.tensor(seen), shift_times(torch.linspace(0, 1, 5), 3.0)[:-1])
    assert seen[1] == pytest.approx(0.25 / (0.25 + 3 * 0.75))  # one step in: 1 / 10
    noise = torch.randn(4000, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ends = integrate(mixture_velocity(MEANS, WEIGHTS, SPREAD), noise, steps=32, sampler="heun", shift=3.0)
    which, distance = nearest(ends, MEANS)
    assert distance.max() < 4 * SPREAD
    assert abs(which.double().mean().item() - WEIGHTS[1].item()) < 0.03


def test_the_loss_is_least_at_the_exact_field_in_the_samplers_convention():
    # The field the samplers integrate (t = 0 noise, t = 1 data) minimises the training loss built
    # from interpolate and target_velocity; the same field with time or sign reversed does not.
    g = torch.Generator().manual_seed(1)
    data = sample_mixture(MEANS, WEIGHTS, SPREAD, 20000, g)
    noise = torch.randn(data.shape, generator=g, dtype=torch.float64)
    t = torch.rand(len(data), generator=g, dtype=torch.float64)
    exact = mixture_velocity(MEANS, WEIGHTS, SPREAD)
    x_t, target = interpolate(noise, data, t), target_velocity(noise, data)
    best = flow_matching_loss(exact(x_t, t), target).item()
    assert best < 0.5 * flow_matching_loss(exact(x_t, 1 - t), target).item()
    assert best < 0.5 * flow_matching_loss(-exact(x_t, t), target).item()
    nudged = flow_matching_loss(exact(x_t, t) + 0.1 * torch.randn(6, generator=g, dtype=torch.float64), target).item()
    assert best < nudged
