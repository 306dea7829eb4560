"""AdamW with decoupled weight decay on matrices only, and a linear-warmup cosine learning-rate schedule.

References: Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, arXiv:1711.05101;
Loshchilov & Hutter 2017, SGDR: Stochastic Gradient Descent with Warm Restarts, arXiv:1608.03983
(the cosine shape); Goyal et al. 2017, arXiv:1706.02677 (linear warmup).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from polymodal.config import TrainConfig


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in two groups.

    Parameters with ``ndim >= 2`` (weight matrices, conv kernels, embedding tables) are decayed by
    ``train_cfg.weight_decay``; the rest (biases, norm gains, scalars such as a logit scale) are not,
    because shrinking them towards zero only fights the normalisation they implement.

    Args:
        model: the module to optimise; parameters with ``requires_grad=False`` are left out.
        train_cfg: reads ``lr``, ``betas`` and ``weight_decay``.

    Returns:
        The optimiser; group 0 is decayed, group 1 is not.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("build_optimizer: the model has no trainable parameters (all requires_grad=False)")
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # One fused kernel over all parameters: on CPU about a fifth of the time of the per-tensor loop
    # on the default preset's ~5 M parameters (BENCHMARKS.md, "Training throughput").
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=train_cfg.lr, betas=tuple(train_cfg.betas), fused=fused or None)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate for optimiser step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the first update already
    moves. Then cosine from 1 to ``min_lr_ratio``, reached at ``step == total_steps`` and held after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> LambdaLR:
    """Linear warmup over ``train_cfg.warmup_steps`` steps, then cosine decay to
    ``lr * min_lr_ratio`` at ``train_cfg.steps``. Call ``scheduler.step()`` once per optimiser step.
    """
    warmup, total, floor = train_cfg.warmup_steps, train_cfg.steps, train_cfg.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)

    return LambdaLR(optimizer, factor)
