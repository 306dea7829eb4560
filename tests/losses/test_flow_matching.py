"""Flow matching's interpolant and target velocity against torchcfm's ConditionalFlowMatcher, and
the masked loss against the dense mean."""

from __future__ import annotations

import pytest
import torch

from polymodal.losses.flow_matching import flow_matching_loss, interpolate, target_velocity


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
