"""Gradient conflict: the pairwise cosine of the gradients that several losses send to the same
(shared) parameters. A negative cosine means one loss's step undoes part of the other's.

Yu et al. 2020, Gradient Surgery for Multi-Task Learning (PCGrad), arXiv:2001.06782, call two
task gradients conflicting when their cosine is negative; seed 003 (scheme 4) asks to watch it for
the FM / contrastive / KL objectives that meet in the shared backbone. ``gradient_conflict`` takes
the named scalar losses and the shared parameters and runs one ``autograd.grad`` per loss,
keeping the graph so the training step can still call ``backward``: L extra backward passes, so
it belongs on a probe batch every few hundred steps, not on every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from polymodal.diagnostics._common import float64


@dataclasses.dataclass(frozen=True)
class GradientConflict:
    """Cosines between per-loss gradients.

    Attributes:
        names: the L loss names, in the order of the rows and columns.
        cosine: (L, L) float64 cosines, 1 on the diagonal; NaN in the row and column of a loss
            whose gradient is zero on these parameters.
        norms: (L,) float64 L2 norm of each loss's gradient.
    """

    names: tuple[str, ...]
    cosine: Tensor
    norms: Tensor


def gradient_conflict(losses: Mapping[str, Tensor], params: Iterable[Tensor]) -> GradientConflict:
    """Cosines of the gradients of each named loss with respect to the shared ``params``.

    Args:
        losses: name -> () scalar loss, all still attached to their graph.
        params: the shared parameters (tensors with ``requires_grad``); a loss that does not
            reach one contributes zeros for it.

    Returns:
        The (L, L) cosines and gradient norms. The graph is retained for the caller's backward.
    """
    params = list(params)
    if not losses or not params:
        raise ValueError("give at least one named loss and one parameter")
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen:
        raise ValueError(f"params {frozen} do not require grad: pass only trainable shared parameters")
    for name, loss in losses.items():
        if loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(f"loss {name!r} must be a scalar attached to the graph, got shape {tuple(loss.shape)}")
    grads = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses.values()]
    gram = torch.zeros(len(losses), len(losses), dtype=torch.float64, device=float64(params[0]).device)  # (L, L)
    for i, param in enumerate(params):
        # One parameter at a time: only (L, numel) of it is ever held in float64.
        stacked = torch.stack([float64(g[i]) if g[i] is not None else float64(param).new_zeros(param.shape) for g in grads])
        stacked = stacked.flatten(1)  # (L, *shape) -> (L, numel)
        gram += (stacked @ stacked.T).to(gram.device)
    return _from_gram(tuple(losses), gram)


def gradient_cosine(gradients: Mapping[str, Tensor]) -> GradientConflict:
    """Cosines of precomputed gradients, e.g. flat vectors gathered by a training loop.

    Args:
        gradients: name -> gradient tensor (any shape, flattened), all of one size.

    Returns:
        The (L, L) cosines and gradient norms.
    """
    if not gradients:
        raise ValueError("give at least one named gradient")
    sizes = {name: g.numel() for name, g in gradients.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"gradients must be of one size (the same parameters), got {sizes}")
    stacked = torch.stack([float64(g).flatten() for g in gradients.values()])  # (L, P)
    return _from_gram(tuple(gradients), stacked @ stacked.T)


def _from_gram(names: tuple[str, ...], gram: Tensor) -> GradientConflict:
    """Cosines and norms from the (L, L) inner products of the gradients."""
    norms = gram.diagonal().clamp(min=0).sqrt()  # (L,)
    outer = norms[:, None] * norms[None, :]  # (L, L)
    cosine = torch.where(outer > 0, gram / outer.clamp(min=torch.finfo(gram.dtype).tiny), float("nan"))
    # Rounding can put |cos| a few ulps above 1.
    return GradientConflict(names=names, cosine=cosine.clamp(-1.0, 1.0), norms=norms)
