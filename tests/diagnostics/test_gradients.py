"""Gradient conflict: hand-computed cosines of hand-made gradients, identical losses at 1, the
per-parameter accumulation against concatenated flat gradients, and the graph left usable."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.diagnostics import gradient_conflict, gradient_cosine


def test_hand_made_gradients_give_the_hand_computed_cosines():
    w = torch.zeros(2, requires_grad=True)
    losses = {
        "a": (w * torch.tensor([3.0, 4.0])).sum(),  # gradient (3, 4), norm 5
        "b": (w * torch.tensor([1.0, 2.0])).sum(),  # gradient (1, 2), norm sqrt 5
        "c": (w * torch.tensor([-3.0, 1.0])).sum(),  # gradient (-3, 1), norm sqrt 10
    }
    result = gradient_conflict(losses, [w])
    assert result.names == ("a", "b", "c")
    assert result.cosine[0, 1].item() == pytest.approx(11 / (5 * math.sqrt(5)))
    assert result.cosine[0, 2].item() == pytest.approx(-5 / (5 * math.sqrt(10)))  # a conflict
    assert result.cosine[1, 2].item() == pytest.approx(-1 / (math.sqrt(5) * math.sqrt(10)))
    torch.testing.assert_close(result.cosine, result.cosine.T)
    torch.testing.assert_close(result.norms, torch.tensor([5.0, math.sqrt(5), math.sqrt(10)], dtype=torch.float64))


def test_identical_losses_have_cosine_one():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    loss = layer(torch.randn(5, 4)).pow(2).mean()
    result = gradient_conflict({"first": loss, "second": 2 * loss}, layer.parameters())
    torch.testing.assert_close(result.cosine, torch.ones(2, 2, dtype=torch.float64))


def _model_losses():
    """A shared trunk with two heads: the trunk is where the two losses meet."""
    torch.manual_seed(1)
    trunk, head_a, head_b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    hidden = torch.tanh(trunk(torch.randn(16, 6)))
    losses = {"a": head_a(hidden).pow(2).mean(), "b": (head_b(hidden) - 1).abs().mean(), "c": hidden.mean()}
    return trunk, losses


def test_per_parameter_accumulation_equals_the_cosine_of_concatenated_gradients():
    trunk, losses = _model_losses()
    params = list(trunk.parameters())
    flat = {
        name: torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for name, loss in losses.items()
    }
    result = gradient_conflict(losses, params)
    for i, a in enumerate(flat):
        for j, b in enumerate(flat):
            want = torch.nn.functional.cosine_similarity(flat[a].double(), flat[b].double(), dim=0)
            assert result.cosine[i, j].item() == pytest.approx(want.item(), abs=1e-12)
    torch.testing.assert_close(gradient_cosine(flat).cosine, result.cosine)


def test_graph_is_kept_for_the_training_step_and_params_are_untouched():
    trunk, losses = _model_losses()
    gradient_conflict(losses, trunk.parameters())
    assert trunk.weight.grad is None  # autograd.grad, not backward: nothing accumulated
    sum(losses.values()).backward()  # the caller's own backward still runs
    assert trunk.weight.grad is not None


def test_a_loss_that_does_not_reach_the_params_has_nan_cosines():
    used, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    result = gradient_conflict({"uses": used.sum(), "skips": unused.sum()}, [used])
    assert result.norms[1].item() == 0.0
    assert math.isnan(result.cosine[0, 1]) and math.isnan(result.cosine[1, 1])
    assert result.cosine[0, 0].item() == 1.0


def test_errors_name_the_problem():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="do not require grad"):
        gradient_conflict({"a": w.sum()}, [w, torch.ones(2)])
    with pytest.raises(ValueError, match="scalar attached to the graph"):
        gradient_conflict({"a": w * 2}, [w])
    with pytest.raises(ValueError, match="at least one"):
        gradient_conflict({}, [w])
    with pytest.raises(ValueError, match="of one size"):
        gradient_cosine({"a": torch.ones(3), "b": torch.ones(4)})
