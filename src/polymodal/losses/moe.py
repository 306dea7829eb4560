"""Auxiliary losses of a routed mixture of experts: the Switch load-balancing loss and the router z-loss.

Load balancing (Fedus et al. 2021, Switch Transformers, arXiv:2101.03961, eq. 4): with E experts,
``f_e`` the fraction of routing assignments sent to expert e (argmax / top-k choices, before any
capacity drop) and ``P_e`` the mean router probability of e over the tokens,

    load_balance = E * sum_e f_e * P_e

It is 1 under perfectly uniform routing and grows as the router concentrates on few experts; the
gradient reaches the router through ``P_e`` (``f_e`` counts, it is not differentiable). For top-k
routing every token makes k assignments and ``f_e`` counts all of them, so ``sum_e f_e = 1`` still.

Router z-loss (Zoph et al. 2022, ST-MoE, arXiv:2202.08906, eq. 5): the mean over tokens of the
squared log-sum-exp of the router logits. It keeps the logits small, so the fp32 softmax stays well
conditioned and the router does not saturate.

Data-parallel training: the load-balancing loss is a product of two batch means, so the mean of
per-rank losses is not the global batch's loss. With ``across_ranks`` the counts and the summed
probabilities are summed over ranks first (the probabilities with gradients): every rank computes
the global batch's loss, and DDP's gradient average gives one process's gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.distributed.collectives import differentiable_sum_over_ranks, sum_over_ranks


def load_balancing_loss(probs: Tensor, expert_index: Tensor, *, across_ranks: bool = False) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs: (T, E) router probabilities per token (rows sum to one), fp32.
        expert_index: (T, k) long, the k experts each token was routed to.
        across_ranks: f and P of every rank's tokens together (see the module docstring); every
            rank must then make the call.

    Returns:
        () the loss in the dtype of ``probs``; 1 for uniform routing.
    """
    if probs.ndim != 2 or expert_index.ndim != 2 or probs.shape[0] != expert_index.shape[0]:
        raise ValueError(
            f"probs must be (T, E) and expert_index (T, k) with the same T, got {tuple(probs.shape)} and "
            f"{tuple(expert_index.shape)}"
        )
    num_experts = probs.shape[1]
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts).to(probs.dtype)  # (E,)
    sizes = torch.tensor([expert_index.numel(), probs.shape[0]], dtype=probs.dtype, device=probs.device)
    prob_sum = probs.sum(dim=0)  # (E,)
    if across_ranks:
        counts, sizes, prob_sum = sum_over_ranks(counts), sum_over_ranks(sizes), differentiable_sum_over_ranks(prob_sum)
    fraction = counts / sizes[0]  # f_e, sums to one
    mean_prob = prob_sum / sizes[1]  # P_e, (E,)
    return num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: ``mean_t logsumexp_e(logits[t])^2``.

    Args:
        logits: (T, E) router logits; -inf entries (experts a token may not use) are ignored, but
            every row needs at least one finite entry.

    Returns:
        () the loss in the dtype of ``logits`` (fp32 for a router).
    """
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
