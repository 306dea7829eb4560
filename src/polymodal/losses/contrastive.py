"""Symmetric InfoNCE (the CLIP loss), dense and tiled; the tiled form never holds the N x N logits.

For a batch of N matched pairs (a_i, b_i) of unit vectors and a scale s (1 / temperature), the
logits are ``L = s * a @ b.T`` (N, N) with the positives on the diagonal, and the loss is the mean
of the two cross-entropies, over rows (a -> b) and over columns (b -> a):

    loss = 1/(2N) * sum_i [ logsumexp_j L_ij  +  logsumexp_j L_ji  -  2 L_ii ]

The dense form builds L, as CLIP and open_clip do: O(N^2) memory, 16 GiB per matrix at N = 64k.
The tiled form walks L in (tile_size, tile_size) tiles, folding each tile into running row and
column log-sum-exps, so it keeps O(N * D + tile_size^2) memory; its backward recomputes every tile
from the saved embeddings and the two log-sum-exp vectors, the way FlashAttention recomputes the
attention matrix (Dao et al. 2022, arXiv:2205.14135). Forward and gradients equal the dense form's
up to float rounding. The same idea applied to contrastive losses: Inf-CL, Cheng et al. 2024,
Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss,
arXiv:2410.17243.

Several processes: each process holds its rows [r0, r0 + n) of the global batch and the gathered
(N, D) embeddings of all processes (see ``info_nce``'s docstring).

References: van den Oord et al. 2018, Representation Learning with Contrastive Predictive Coding
(InfoNCE), arXiv:1807.03748; Radford et al. 2021, CLIP, arXiv:2103.00020.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

logger = logging.getLogger(__name__)

# A (2048, 2048) fp32 tile is 16 MiB; large tiles mean few, large operations, which matters on a
# loaded CPU where each parallel operation can wait a scheduler tick (1024 was 1.5-2x slower at 4k).
DEFAULT_TILE_SIZE = 2048
# Above this many columns ``info_nce`` tiles by default: the dense peak (about 4.4 N^2 floats,
# measured) passes 1 GiB at 8k and grows 4x per doubling, while the tiled form is already about as
# fast at 4k (benchmarks/results_contrastive.md).
DEFAULT_TILED_ABOVE = 4096


def info_nce(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    a_all: Tensor | None = None,
    b_all: Tensor | None = None,
    row_offset: int = 0,
    tile_size: int | None = None,
    tiled_above: int | None = DEFAULT_TILED_ABOVE,
) -> Tensor:
    """Symmetric InfoNCE, tiled when asked to (``tile_size``) or when the batch is large.

    One process: pass the (N, D) embeddings as ``a`` and ``b``; the positive of row i is column i.

    Several processes (data parallel): each process passes its own (n, D) rows as ``a`` and ``b``,
    the (N, D) embeddings gathered from every process as ``a_all`` and ``b_all`` (with gradients,
    e.g. ``torch.distributed.nn.functional.all_gather`` concatenated in rank order), and
    ``row_offset`` = r0, the index of its first row in the gathered batch. The process then computes
    the a -> b cross-entropy of its rows of the global logits (``a @ b_all.T``) and the b -> a
    cross-entropy of its columns (``b @ a_all.T``), i.e. its share of the global loss, with the
    positive of local row i at global column r0 + i; this is open_clip's ``local_loss=True``, and
    only O(n * N) logits (or one tile) exist per process instead of N x N. The result is the mean
    over the process's n rows, so the mean of the per-process losses (what gradient averaging in
    DDP computes, for equal n) is the global loss; with unequal n weight each by n / N. Gradients
    reach the local rows directly and the other processes' rows through the gathered tensors.

    Args:
        a: (n, D) embeddings of one side (e.g. images), L2-normalised by the caller.
        b: (n, D) embeddings of the other side (e.g. texts), row i paired with ``a[i]``.
        logit_scale: () or float, the multiplier of the cosine similarities (1 / temperature), e.g.
            ``LogitScale()()``; a gradient flows to it when it requires one.
        a_all: (N, D) ``a`` gathered over processes, or None for a single process.
        b_all: (N, D) ``b`` gathered over processes; given together with ``a_all``.
        row_offset: r0, where this process's rows start in the gathered batch (0 <= r0 <= N - n).
        tile_size: tile the logits in (tile_size, tile_size) blocks; forces the tiled form.
        tiled_above: with ``tile_size`` None, tile (at ``DEFAULT_TILE_SIZE``) when N exceeds this;
            None keeps the dense form at every size.

    Returns:
        () loss in nats, float32 (float64 for float64 inputs).
    """
    num_columns = a.shape[0] if a_all is None else a_all.shape[0]
    if tile_size is None and tiled_above is not None and num_columns > tiled_above:
        tile_size = DEFAULT_TILE_SIZE
        logger.debug("info_nce: %d columns > tiled_above=%d, tiling at %d", num_columns, tiled_above, tile_size)
    if tile_size is None:
        return info_nce_dense(a, b, logit_scale, a_all=a_all, b_all=b_all, row_offset=row_offset)
    return info_nce_tiled(a, b, logit_scale, a_all=a_all, b_all=b_all, row_offset=row_offset, tile_size=tile_size)


def info_nce_dense(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    a_all: Tensor | None = None,
    b_all: Tensor | None = None,
    row_offset: int = 0,
) -> Tensor:
    """Symmetric InfoNCE from the materialised logits; the reference for the tiled form.

    Args and Returns: as ``info_nce`` (without the tiling settings).
    """
    _check(a, b, a_all, b_all, row_offset)
    compute = torch.promote_types(a.dtype, torch.float32)
    # fp32 island: logits reach |s| = 100 and a softmax over tens of thousands of them; bf16 logits
    # would carry an absolute error of about 0.4 each.
    scale = _as_scale(logit_scale, compute, a.device)
    a, b = a.to(compute), b.to(compute)
    if a_all is None:
        logits = scale * (a @ b.T)  # (N, D) @ (D, N) -> (N, N)
        labels = torch.arange(a.shape[0], device=a.device)  # (N,)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    a_all, b_all = a_all.to(compute), b_all.to(compute)
    logits_ab = scale * (a @ b_all.T)  # (n, D) @ (D, N) -> (n, N): this process's rows
    logits_ba = scale * (b @ a_all.T)  # (n, N): this process's columns, transposed
    labels = torch.arange(row_offset, row_offset + a.shape[0], device=a.device)  # (n,)
    return (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels)) / 2


def info_nce_tiled(
    a: Tensor,
    b: Tensor,
    logit_scale: Tensor | float,
    *,
    a_all: Tensor | None = None,
    b_all: Tensor | None = None,
    row_offset: int = 0,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Tensor:
    """Symmetric InfoNCE over (tile_size, tile_size) tiles of the logits, recomputed in backward.

    Peak memory beyond the inputs and their gradients: a few tiles, the (N,) log-sum-exps and one
    scaled copy of an (n, D) input. One process makes a single pass over the N x N tiles for both
    directions; with ``a_all`` given, two passes over n x N (its rows and its columns).

    Args and Returns: as ``info_nce``; ``tile_size`` >= 1, the last tile of a row or column may be
    smaller. Double backward is not supported.
    """
    _check(a, b, a_all, b_all, row_offset)
    if tile_size < 1:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    compute = torch.promote_types(a.dtype, torch.float32)
    # fp32 island: as in info_nce_dense, and the running log-sum-exps add up thousands of tiles.
    scale = _as_scale(logit_scale, compute, a.device)
    a, b = a.to(compute), b.to(compute)
    if a_all is None:
        return _SymmetricTiledInfoNCE.apply(a, b, scale, tile_size)
    a_all, b_all = a_all.to(compute), b_all.to(compute)
    loss_ab = _TiledCrossEntropy.apply(a, b_all, scale, row_offset, tile_size)
    loss_ba = _TiledCrossEntropy.apply(b, a_all, scale, row_offset, tile_size)
    return (loss_ab + loss_ba) / 2


class _SymmetricTiledInfoNCE(torch.autograd.Function):
    """Both directions of one process's N x N logits in a single pass over its tiles.

    With P = softmax over rows + softmax over columns of L = s a b^T, dloss/dL = P / 2N - I / N,
    so grad_a = s (P b - 2 b) / 2N, grad_b = (P^T (s a) - 2 s a) / 2N and
    grad_s = sum_i a_i . (P b - 2 b)_i / 2N. Only P b and P^T (s a) need the tiles.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, a: Tensor, b: Tensor, scale: Tensor, tile_size: int) -> Tensor:
        num = a.shape[0]
        a_scaled = a * scale  # (N, D); L = a_scaled @ b.T
        row_lse = a.new_full((num,), float("-inf"))  # (N,) logsumexp_j L_ij so far
        col_lse = a.new_full((num,), float("-inf"))  # (N,) logsumexp_i L_ij so far
        for i0, i1 in _blocks(num, tile_size):
            for j0, j1 in _blocks(num, tile_size):
                tile = a_scaled[i0:i1] @ b[j0:j1].T  # (ti, D) @ (D, tj) -> (ti, tj)
                torch.logaddexp(row_lse[i0:i1], _logsumexp(tile, dim=1), out=row_lse[i0:i1])
                torch.logaddexp(col_lse[j0:j1], _logsumexp(tile, dim=0), out=col_lse[j0:j1])
        positives = (a_scaled * b).sum(dim=1)  # (N,) L_ii
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.tile_size = tile_size
        return (row_lse.sum() + col_lse.sum() - 2 * positives.sum()) / (2 * num)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        num = a.shape[0]
        a_scaled = a * scale  # (N, D)
        p_b = torch.zeros_like(a)  # (N, D) P @ b
        pt_a = torch.zeros_like(b)  # (N, D) P^T @ a_scaled
        for i0, i1 in _blocks(num, ctx.tile_size):
            for j0, j1 in _blocks(num, ctx.tile_size):
                tile = a_scaled[i0:i1] @ b[j0:j1].T  # (ti, tj) logits, recomputed
                probs = (tile - row_lse[i0:i1, None]).exp_()  # (ti, tj) softmax over the row
                probs += tile.sub_(col_lse[None, j0:j1]).exp_()  # + softmax over the column
                p_b[i0:i1].addmm_(probs, b[j0:j1])  # (ti, tj) @ (tj, D)
                pt_a[j0:j1].addmm_(probs.T, a_scaled[i0:i1])  # (tj, ti) @ (ti, D)
        coef = grad_loss / (2 * num)
        p_b.sub_(b, alpha=2)  # (N, D) P b - 2 b
        grad_scale = coef * (a * p_b).sum() if ctx.needs_input_grad[2] else None
        # In place: at N = 64k each (N, D) buffer is 128 MiB.
        grad_a = p_b.mul_(coef * scale) if ctx.needs_input_grad[0] else None
        grad_b = pt_a.sub_(a_scaled, alpha=2).mul_(coef) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, grad_scale, None


class _TiledCrossEntropy(torch.autograd.Function):
    """One direction for one process: mean_i [logsumexp_j L_ij - L_i,r0+i] with L = s q k^T, q its
    (n, D) rows and k the gathered (N, D) columns.

    With P the row softmax of L, dloss/dL = (P - E) / n where E holds the positives, so
    grad_q = s (P k - k_pos) / n, grad_k = (P^T (s q) - E^T (s q)) / n and
    grad_s = sum_i q_i . (P k - k_pos)_i / n.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, q: Tensor, k: Tensor, scale: Tensor, row_offset: int, tile_size: int) -> Tensor:
        num_rows, num_cols = q.shape[0], k.shape[0]
        q_scaled = q * scale  # (n, D)
        lse = q.new_full((num_rows,), float("-inf"))  # (n,) logsumexp_j L_ij so far
        for i0, i1 in _blocks(num_rows, tile_size):
            for j0, j1 in _blocks(num_cols, tile_size):
                tile = q_scaled[i0:i1] @ k[j0:j1].T  # (ti, D) @ (D, tj) -> (ti, tj)
                torch.logaddexp(lse[i0:i1], _logsumexp(tile, dim=1), out=lse[i0:i1])
        positives = (q_scaled * k[row_offset : row_offset + num_rows]).sum(dim=1)  # (n,) L_i,r0+i
        ctx.save_for_backward(q, k, scale, lse)
        ctx.row_offset, ctx.tile_size = row_offset, tile_size
        return (lse.sum() - positives.sum()) / num_rows

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        q, k, scale, lse = ctx.saved_tensors
        num_rows, num_cols = q.shape[0], k.shape[0]
        rows = slice(ctx.row_offset, ctx.row_offset + num_rows)  # the positives' columns
        q_scaled = q * scale  # (n, D)
        p_k = torch.zeros_like(q)  # (n, D) P @ k
        pt_q = torch.zeros_like(k)  # (N, D) P^T @ q_scaled
        for i0, i1 in _blocks(num_rows, ctx.tile_size):
            for j0, j1 in _blocks(num_cols, ctx.tile_size):
                tile = q_scaled[i0:i1] @ k[j0:j1].T  # (ti, tj) logits, recomputed
                probs = tile.sub_(lse[i0:i1, None]).exp_()  # (ti, tj) softmax over the row
                p_k[i0:i1].addmm_(probs, k[j0:j1])  # (ti, tj) @ (tj, D)
                pt_q[j0:j1].addmm_(probs.T, q_scaled[i0:i1])  # (tj, ti) @ (ti, D)
        coef = grad_loss / num_rows
        p_k.sub_(k[rows])  # (n, D) P k - k_pos
        grad_scale = coef * (q * p_k).sum() if ctx.needs_input_grad[2] else None
        grad_q = p_k.mul_(coef * scale) if ctx.needs_input_grad[0] else None  # in place, as above
        grad_k = None
        if ctx.needs_input_grad[1]:
            pt_q[rows] -= q_scaled
            grad_k = pt_q.mul_(coef)
        return grad_q, grad_k, grad_scale, None, None


def _logsumexp(tile: Tensor, dim: int) -> Tensor:
    """``tile.logsumexp(dim)`` for a finite 2-D tile, written out: on CPU (torch 2.x) the built-in
    runs about 10x slower than these four vectorised passes."""
    shift = tile.amax(dim=dim, keepdim=True)  # (ti, 1) or (1, tj): the largest term becomes exp(0)
    return (tile - shift).exp_().sum(dim=dim).log_().add_(shift.squeeze(dim))


def _blocks(size: int, tile_size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering range(size) in steps of tile_size; the last may be short."""
    return [(start, min(start + tile_size, size)) for start in range(0, size, tile_size)]


def _as_scale(logit_scale: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scale as a () tensor of ``dtype`` (differentiable when it is a tensor)."""
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        return logit_scale.to(device=device, dtype=dtype).reshape(())
    return torch.tensor(float(logit_scale), dtype=dtype, device=device)


def _check(a: Tensor, b: Tensor, a_all: Tensor | None, b_all: Tensor | None, row_offset: int) -> None:
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must both be (n, D) with n >= 1")
    if (a_all is None) != (b_all is None):
        raise ValueError("give a_all and b_all together, or neither")
    if a_all is None:
        if row_offset != 0:
            raise ValueError(f"row_offset ({row_offset}) needs the gathered a_all and b_all")
        return
    if a_all.ndim != 2 or a_all.shape != b_all.shape or a_all.shape[1] != a.shape[1]:
        raise ValueError(f"a_all {tuple(a_all.shape)} and b_all {tuple(b_all.shape)} must be (N, {a.shape[1]})")
    if not 0 <= row_offset <= a_all.shape[0] - a.shape[0]:
        raise ValueError(f"rows [{row_offset}, {row_offset + a.shape[0]}) are not inside the {a_all.shape[0]} gathered")
