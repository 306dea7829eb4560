"""Gradient surgery in a data-parallel run: each loss term's gradient averaged over the ranks before
the surgery, so that every rank projects (PCGrad) or weighs (GradNorm) the same global gradients and
takes the same step, the step one process would take on every rank's items at once.

The surgery is non-linear in the per-term gradients (a projection depends on their dot products, a
GradNorm weight on their norms), so averaging after it, as DDP would average ``.grad``, is not the
same: each rank would have projected its own half-batch's conflicts. Averaging first costs one
all-reduce of a gradient-sized buffer per term instead of one in all.

A term (or a parameter of a term) that one rank's items never reached still takes part, as zeros,
exactly as DDP averages an unused parameter; which terms and parameters exist is agreed between the
ranks first, so every rank issues the same collectives in the same order.

Reference: Yu et al. 2020, Gradient Surgery for Multi-Task Learning, arXiv:2001.06782; Chen et al.
2018, GradNorm, arXiv:1711.02257; Li et al. 2020, PyTorch Distributed, arXiv:2006.15704.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from polymodal.distributed.collectives import gather_objects, sum_over_ranks
from polymodal.distributed.process import world_size

if TYPE_CHECKING:
    from polymodal.training.gradient_surgery import PerLossGradients


def _union_of_names(names: Sequence[str]) -> list[str]:
    """The sorted union of every rank's ``names`` (one small all-gather of Python objects)."""
    return sorted({name for names_r in gather_objects(sorted(names)) for name in names_r})


def _average_slot(grads: list[Tensor | None], params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    """One gradient per parameter (None: not reached here) -> its mean over ranks, None only where no
    rank reached the parameter. Two all-reduces: which parameters were reached, then their sum."""
    reference = params[0]
    reached = torch.tensor([grad is not None for grad in grads], dtype=torch.float32, device=reference.device)
    reached = sum_over_ranks(reached) > 0  # (P,) reached on some rank
    indices = [i for i, anywhere in enumerate(reached.tolist()) if anywhere]
    if not indices:
        return [None] * len(params)
    parts = [(grads[i] if grads[i] is not None else torch.zeros_like(params[i])).reshape(-1) for i in indices]
    flat = sum_over_ranks(torch.cat(parts)) / world_size()  # (S,) the reached parameters' gradients, concatenated
    averaged: list[Tensor | None] = [None] * len(params)
    for i, part in zip(indices, flat.split([params[i].numel() for i in indices])):
        averaged[i] = part.view_as(params[i])  # (S_i,) -> the parameter's shape
    return averaged


def average_term_gradients(collected: PerLossGradients) -> None:
    """Replace ``collected``'s per-term gradients, the plain rest and the term values by their means
    over ranks (in place; nothing changes in a single process). Every rank must call it.

    A term's value is averaged over the ranks that have it (its loss there); its gradient over all
    ranks (zeros where absent), as DDP would average it.
    """
    if world_size() == 1:
        return
    params = collected.params
    names = _union_of_names(list(collected.grads))
    collected.grads = {
        name: _average_slot(collected.grads.get(name, [None] * len(params)), params) for name in names
    }  # fmt: skip
    collected.rest = _average_slot(collected.rest, params)
    value_names = _union_of_names(list(collected.values))
    if not value_names:
        return
    device = params[0].device
    local = [collected.values.get(name) for name in value_names]
    sums = torch.stack([v.float() if v is not None else torch.zeros((), device=device) for v in local])  # (T,)
    counts = torch.tensor([float(v is not None) for v in local], device=device)  # (T,)
    sums, counts = sum_over_ranks(sums), sum_over_ranks(counts)
    collected.values = {name: value / count for name, value, count in zip(value_names, sums, counts)}


def average_gradients_(params: Sequence[nn.Parameter]) -> None:
    """Each parameter's ``.grad`` replaced by its mean over ranks (None on a rank: zeros; None after
    only where no rank has one). Every rank must call it; nothing changes in a single process."""
    if world_size() == 1 or not params:
        return
    for param, grad in zip(params, _average_slot([p.grad for p in params], params)):
        param.grad = None if grad is None else grad.clone()
