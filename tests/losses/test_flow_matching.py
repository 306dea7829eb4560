"""Flow matching's interpolant and target velocity against torchcfm's ConditionalFlowMatcher, and
the masked loss against the dense mean; training times (uniform or logit-normal, shifted toward
noise) against SD3's formula and their distribution functions."""

from __future__ import annotations

import pytest
import torch

from polymodal.losses.flow_matching import flow_matching_loss, interpolate, shift_times, target_velocity, training_times


def test_interpolant_and_velocity_equal_torchcfm():
    cfm = pytest.importorskip("torchcfm.conditional_flow_matching")
    torch.manual_seed(0)
    noise, data = torch.randn(6, 1, 8, 12), torch.rand(6, 1, 8, 12) * 2 - 1
    t = torch.rand(6)
    # torchcfm: x0 is the noise, x1 the data, mu_t = t x1 + (1 - t) x0, u_t = x1 - x0; sigma = 0
    # makes x_t = mu_t (our convention; MetaQuery's s = 1 - t runs the other way).
    matcher = cfm.ConditionalFlowMatcher(sigma=0.0)
    t_peer, x_peer, u_peer = matcher.sample_location_and_conditional_flow(noise, data, t=t)
    assert torch.equal(t_peer, t)
    torch.testing.assert_close(interpolate(noise, data, t), x_peer, rtol=0, atol=1e-6)
    torch.testing.assert_close(target_velocity(noise, data), u_peer, rtol=0, atol=0)


def test_the_path_runs_from_noise_to_data_at_the_target_velocity():
    torch.manual_seed(1)
    noise, data = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    zeros, ones = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(interpolate(noise, data, zeros), noise)
    torch.testing.assert_close(interpolate(noise, data, ones), data)
    t, step = torch.full((3,), 0.3), 1e-3
    slope = (interpolate(noise, data, t + step) - interpolate(noise, data, t - step)) / (2 * step)
    torch.testing.assert_close(slope, target_velocity(noise, data), rtol=1e-2, atol=1e-2)


def test_masked_loss_is_the_mean_over_real_positions():
    torch.manual_seed(2)
    velocity, target = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    velocity[~mask] = float("nan")  # padding never leaks in
    dense = torch.cat([(velocity[b, mask[b]] - target[b, mask[b]]).square().flatten() for b in range(3)]).mean()
    torch.testing.assert_close(flow_matching_loss(velocity, target, mask), dense)
    torch.testing.assert_close(flow_matching_loss(target + 1, target), torch.tensor(1.0))


def test_one_time_per_item_is_required():
    with pytest.raises(ValueError, match="one time per item"):
        interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))


def test_the_shift_is_sd3s_on_the_noise_level():
    # SD3 (arXiv:2403.03206) shifts its noise level sigma = 1 - t: sigma' = s sigma / (1 + (s - 1) sigma).
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        sigma = 1 - t
        sd3 = 1 - shift * sigma / (1 + (shift - 1) * sigma)
        torch.testing.assert_close(shift_times(t, shift), sd3)
    assert torch.equal(shift_times(t.float(), 1.0), t.float())  # exactly: unshifted grids and times are as before
    assert shift_times(torch.tensor(0.5), 3.0).item() == pytest.approx(0.25)  # 0.5 -> 1 / (1 + s)
    assert torch.all(shift_times(t, 3.0).diff() > 0)  # increasing, ends fixed
    assert shift_times(t, 3.0)[[0, -1]].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="time shift must be > 0"):
        shift_times(t, 0.0)


def _max_cdf_gap(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance of ``samples`` (N,) to a distribution function ``cdf``."""
    x = samples.double().sort().values
    n = len(x)
    below, above = torch.arange(n, dtype=torch.float64) / n, torch.arange(1, n + 1, dtype=torch.float64) / n
    return max((cdf(x) - below).abs().max().item(), (above - cdf(x)).abs().max().item())


def test_training_times_follow_their_distribution_functions():
    # Shifted uniform: P(t' <= u) = P(t <= inverse shift of u) = s u / (1 - u + s u).
    # Logit-normal: P(t <= u) = Phi(logit(u)); shifted, Phi(logit(inverse shift of u)).
    n, g = 20000, torch.Generator().manual_seed(0)
    normal = torch.distributions.Normal(0.0, 1.0)
    inverse = lambda u, s: s * u / (1 - u + s * u)  # noqa: E731
    uniform = training_times(n, shift=3.0, generator=g)
    assert _max_cdf_gap(uniform, lambda u: inverse(u, 3.0)) < 0.015  # KS 1% critical value at n = 20000: 0.0115
    logit = training_times(n, distribution="logit_normal", shift=2.0, generator=g)
    assert _max_cdf_gap(logit, lambda u: normal.cdf(torch.logit(inverse(u, 2.0)))) < 0.015
    assert _max_cdf_gap(uniform, lambda u: u) > 0.2  # against unshifted times the gap is large
    assert uniform.median().item() == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="time distribution 'beta' is not valid; valid: uniform, logit_normal"):
        training_times(4, distribution="beta")
