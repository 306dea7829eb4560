"""The collectives polymodal's parts call: rows gathered from every rank (with gradients), sums and
broadcasts. Each is the identity in a single process, so a part calls them unconditionally.

Every rank must call the same collectives in the same order; the callers keep their control flow
the same on every rank (a rank with no rows still gathers, with zero rows).

The gathered rows' backward: rank r's rows appear in every rank's gathered copy, so their gradient
is the sum over ranks of each copy's gradient (an all-reduce of the gathered gradient, then this
rank's slice). With DDP averaging parameter gradients over ranks, a loss computed on the gathered
rows by every rank then trains exactly as one process would on the mean of those losses. PyTorch's
own ``torch.distributed.nn.all_gather`` needs all-to-all or reduce-scatter, which gloo lacks, and
equal sizes on every rank; this one needs only all-gather and all-reduce.

Reference: Radford et al. 2021, CLIP, arXiv:2103.00020 (negatives gathered from every worker).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx

from polymodal.distributed.process import comm_device, rank, world_size


def row_counts(num_rows: int, device: torch.device) -> list[int]:
    """How many rows each rank holds, in rank order (one small all-gather)."""
    if world_size() == 1:
        return [num_rows]
    mine = torch.tensor([num_rows], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine)
    return [int(c) for c in counts]


class _GatherRows(torch.autograd.Function):
    """(n_r, ...) rows of every rank -> (sum n_r, ...) in rank order; backward as the module says."""

    @staticmethod
    def forward(ctx: FunctionCtx, rows: Tensor, counts: list[int]) -> Tensor:
        padded = rows.new_zeros(max(counts), *rows.shape[1:])  # all_gather needs one size on every rank
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.counts = counts
        return torch.cat([part[:count] for part, count in zip(parts, counts)])  # (N, ...)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()  # (N, ...): every rank's gradient of the gathered copy
        dist.all_reduce(grad)
        start = sum(ctx.counts[: rank()])
        return grad[start : start + ctx.counts[rank()]], None


def gather_rows(rows: Tensor, counts: list[int] | None = None) -> Tensor:
    """Every rank's rows, concatenated in rank order; differentiable (see the module docstring).

    Args:
        rows: (n_r, ...) this rank's rows; n_r may differ between ranks (and be 0).
        counts: each rank's n_r, when the caller already knows them (:func:`row_counts`).

    Returns:
        (N, ...) with N = sum of n_r; ``rows`` itself in a single process.
    """
    if world_size() == 1:
        return rows
    counts = counts if counts is not None else row_counts(rows.shape[0], rows.device)
    return _GatherRows.apply(rows, counts)


class _SumOverRanks(torch.autograd.Function):
    """The sum over ranks; each rank's input then influences every rank's loss, so its gradient
    is the sum over ranks of the output's gradient."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: Tensor) -> Tensor:
        total = tensor.contiguous().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def differentiable_sum_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over ranks, with gradients (e.g. a statistic of the global
    batch that a loss is a non-linear function of); ``tensor`` itself in a single process."""
    if world_size() == 1:
        return tensor
    return _SumOverRanks.apply(tensor)


def sum_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise sum of ``tensor`` over ranks, as a new tensor (no gradient)."""
    if world_size() == 1:
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


def mean_over_ranks(tensor: Tensor) -> Tensor:
    """The element-wise mean of ``tensor`` over ranks (no gradient), e.g. a logged loss."""
    return sum_over_ranks(tensor) / world_size()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one rank, e.g. a stop signal one rank has seen."""
    if world_size() == 1:
        return flag
    return bool(sum_over_ranks(torch.tensor([int(flag)], device=comm_device())).item())


def broadcast_(tensor: Tensor, src: int = 0) -> Tensor:
    """``tensor`` overwritten in place with rank ``src``'s (a random choice made once, for all)."""
    if world_size() > 1:
        dist.broadcast(tensor, src)
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order, on every rank (``[value]`` in a single
    process). Tensors inside must be on the CPU: each rank unpickles them where they were."""
    if world_size() == 1:
        return [value]
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, value)
    return every
