"""Attention masks for the shared backbone: causal and prefix-LM (bidirectional source, causal target).

Convention: boolean, True = the query may attend the key, shaped (B, 1, N_query, N_key) so one mask
serves every head of ``F.scaled_dot_product_attention``.

Reference: Raffel et al. 2019, Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer (T5), arXiv:1910.10683, section 3.2.1 (the prefix-LM mask).
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(n: int, *, device: torch.device | str | None = None) -> Tensor:
    """(n, n) bool, True on and below the diagonal: token i may attend tokens j <= i."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def prefix_lm_mask(is_target: Tensor, valid: Tensor) -> Tensor:
    """Mask for ``[source tokens][target tokens]`` sequences with padding.

    Query i may attend key j iff ``valid[j]`` and (``not is_target[j]`` or (``is_target[i]`` and
    ``j <= i``)): sources attend all sources bidirectionally and never see targets; targets attend
    all sources and earlier targets. Padded keys are never attended, except that every token may
    attend itself, so a padded query row is not fully masked (a fully masked softmax row is NaN)
    while valid queries are unaffected.

    Args:
        is_target: (B, N) bool, True for target (causally generated) tokens.
        valid: (B, N) bool, False for padding.

    Returns:
        (B, 1, N, N) bool.
    """
    n = is_target.shape[-1]
    key_is_source = ~is_target[:, None, :]  # (B, 1, N_key)
    query_is_target = is_target[:, :, None]  # (B, N_query, 1)
    earlier_or_self = causal_mask(n, device=is_target.device)  # (N_query, N_key)
    allowed = valid[:, None, :] & (key_is_source | (query_is_target & earlier_or_self))  # (B, N, N)
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=is_target.device)
    return allowed[:, None]  # (B, 1, N, N)
