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
"""

from __future__ import annotations

import torch
from torch import Tensor


def load_balancing_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e``.

    Args:
        probs: (T, E) router probabilities per token (rows sum to one), fp32.
        expert_index: (T, k) long, the k experts each token was routed to.

    Returns:
        () the loss in the dtype of ``probs``; 1 for uniform routing.
    """
    if probs.ndim != 2 or expert_index.ndim != 2 or probs.shape[0] != expert_index.shape[0]:
        raise ValueError(
            f"probs must be (T, E) and expert_index (T, k) with the same T, got {tuple(probs.shape)} and "
            f"{tuple(expert_index.shape)}"
        )
    num_experts = probs.shape[1]
    counts = torch.bincount(expert_index.reshape(-1), minlength=num_experts)  # (E,)
    fraction = counts.to(probs.dtype) / expert_index.numel()  # f_e, sums to one
    mean_prob = probs.mean(dim=0)  # P_e, (E,)
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
