"""Expert usage per modality in a mixture-of-experts layer: which experts each modality's tokens are
routed to, and how spread out that routing is.

Seed 003 (scheme 4) routes tokens of text, images and a shared pool to expert clusters (Fedus et
al. 2021, Switch Transformers, arXiv:2101.03961; Riquelme et al. 2021, Scaling Vision with Sparse
Mixture of Experts, arXiv:2106.05974). Whether the clusters stay modality-specific shows in the
(M, E) share matrix: row m is the fraction of modality m's routing assignments (top-k slots,
optionally weighted by the gates) that went to each expert. The row entropy (nats) is 0 when a
modality uses one expert and log E when it spreads evenly; a falling entropy with a rising load
loss is the usual sign of router collapse.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from polymodal.diagnostics._common import MODALITY_ORDER, check_modality_ids, float64
from polymodal.modality import Modality


@dataclasses.dataclass(frozen=True)
class ExpertUsage:
    """Routing of each modality's tokens over E experts.

    Attributes:
        modalities: the M modalities present among the tokens, in ``MODALITY_ORDER``; the rows.
        counts: (M, E) float64 number of routing assignments (or summed gate weights).
        share: (M, E) float64 ``counts`` normalised per row (each row sums to 1).
        entropy: (M,) float64 entropy of each row of ``share`` in nats, in [0, log E].
        normalized_entropy: (M,) float64 ``entropy / log E`` in [0, 1] (1 for a single expert).
    """

    modalities: tuple[Modality, ...]
    counts: Tensor
    share: Tensor
    entropy: Tensor
    normalized_entropy: Tensor


def expert_usage(
    expert_ids: Tensor,
    token_modalities: Tensor,
    num_experts: int,
    *,
    gates: Tensor | None = None,
    token_mask: Tensor | None = None,
) -> ExpertUsage:
    """The (M, E) share of each modality's routing assignments per expert, and its entropy.

    Args:
        expert_ids: (..., k) int64 experts each token was routed to (top-k), e.g. (B, N, k).
        token_modalities: (...) int64 modality id of each token (indices into ``MODALITY_ORDER``),
            the leading shape of ``expert_ids`` or broadcastable to it (e.g. (N,) for (B, N, k)).
        num_experts: E, the number of experts.
        gates: (..., k) router weights of those assignments; None counts each assignment as 1.
        token_mask: (...) True at real tokens; padding is not counted.

    Returns:
        An ``ExpertUsage`` over the modalities that have at least one counted token.
    """
    if expert_ids.ndim < 1 or expert_ids.dtype.is_floating_point:
        raise ValueError(f"expert_ids must be (..., k) integer expert indices, got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if expert_ids.numel() and (int(expert_ids.min()) < 0 or int(expert_ids.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got [{int(expert_ids.min())}, {int(expert_ids.max())}]")
    check_modality_ids(token_modalities)
    lead, top_k = expert_ids.shape[:-1], expert_ids.shape[-1]
    ids = token_modalities.to(expert_ids.device, torch.int64).expand(lead)  # (...) per token
    weights = torch.ones(expert_ids.shape, dtype=torch.float64, device=expert_ids.device) if gates is None else float64(gates)
    if weights.shape != expert_ids.shape:
        raise ValueError(f"gates {tuple(weights.shape)} must match expert_ids {tuple(expert_ids.shape)}")
    if token_mask is not None:
        weights = weights * token_mask.to(weights.device).expand(lead)[..., None]  # (..., k)
    # Flat index modality * E + expert, so one bincount fills the (M, E) table.
    flat = ids[..., None].expand(*lead, top_k) * num_experts + expert_ids.long()  # (..., k)
    counts = torch.bincount(flat.flatten(), weights.flatten(), minlength=len(MODALITY_ORDER) * num_experts)
    return usage_from_counts(counts.reshape(len(MODALITY_ORDER), num_experts))  # (M_all * E,) -> (M_all, E)


def usage_from_counts(counts: Tensor) -> ExpertUsage:
    """The ``ExpertUsage`` of an already counted routing table, e.g. a MoE layer's own record.

    Args:
        counts: (M_all, E) routing assignments (or gate weights) per modality row of
            ``MODALITY_ORDER`` and expert; rows with no assignment are left out of the result.

    Returns:
        An ``ExpertUsage`` over the modalities whose row is not empty.
    """
    if counts.ndim != 2 or counts.shape[0] != len(MODALITY_ORDER):
        raise ValueError(f"counts must be (M, E) with one row per modality of MODALITY_ORDER, got {tuple(counts.shape)}")
    counts = float64(counts)
    num_experts = counts.shape[1]
    present = counts.sum(dim=1) > 0  # (M_all,)
    counts = counts[present]  # (M, E)
    share = counts / counts.sum(dim=1, keepdim=True)
    entropy = -torch.special.xlogy(share, share).sum(dim=1)  # 0 log 0 = 0
    # With one expert every row has entropy 0 = log 1: call that fully spread rather than divide by 0.
    normalized = entropy / math.log(num_experts) if num_experts > 1 else torch.ones_like(entropy)
    modalities = tuple(m for m, keep in zip(MODALITY_ORDER, present.tolist()) if keep)
    return ExpertUsage(modalities=modalities, counts=counts, share=share, entropy=entropy, normalized_entropy=normalized)
