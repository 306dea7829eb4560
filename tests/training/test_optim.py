"""AdamW parameter groups and the warmup-cosine schedule, checked against hand-computed values."""

import math

import pytest
import torch
from torch import nn

from polymodal.config import TrainConfig
from polymodal.training.optim import build_optimizer, build_scheduler, lr_factor


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_split_by_ndim_and_skip_frozen():
    model = _Mixed()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = (set(map(id, g["params"])) for g in opt.param_groups)
    assert decay == {id(model.embed.weight), id(model.linear.weight)}
    assert no_decay == {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias), id(model.scale)}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_zero_gradient_step_decays_only_matrices():
    # With a zero gradient AdamW's only move is the decoupled decay: p <- p * (1 - lr * wd).
    model = _Mixed()
    cfg = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0)
    opt = build_optimizer(model, cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for name, p in model.named_parameters():
        if name in ("embed.weight", "linear.weight"):
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.25),  # warmup (step + 1) / 4
        (1, 0.5),
        (3, 1.0),
        (4, 1.0),  # cosine starts at its peak
        (8, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 16))),
        (12, 0.55),  # half way: 0.1 + 0.9 * 0.5
        (20, 0.1),  # the floor lr * min_lr_ratio at train.steps
        (30, 0.1),  # held after
    ],
)
def test_lr_factor_hand_computed(step, expected):
    got = lr_factor(step, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert got == pytest.approx(expected, abs=1e-12)


def test_scheduler_drives_optimizer_lr_like_the_formula():
    cfg = TrainConfig(lr=3e-3, steps=20, warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(25):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        want = 3e-3 * lr_factor(step, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
        assert lrs == pytest.approx([want, want], rel=1e-12)
    assert seen[0][0] > 0  # the first update already moves
    assert max(lr for lr, _ in seen) == pytest.approx(3e-3)


def test_no_warmup_starts_at_full_lr():
    assert lr_factor(0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 1.0
    assert lr_factor(10, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == pytest.approx(0.0, abs=1e-12)


def test_no_trainable_parameters_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())
