"""How token sequences go through the shared backbone: RoPE positions that count real tokens only,
one pass over ``[source][target]`` in the prefix-LM layout, one pass over a source alone, and the
masked mean that pools a source's states.

Reference: the prefix-LM layout of Raffel et al. 2019, T5, arXiv:1910.10683 (section 3.2.1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.models.masks import prefix_lm_mask


def real_positions(valid: Tensor) -> Tensor:
    """(B, N) bool -> (B, N) long RoPE positions counting real tokens only, so padding a batch never
    shifts anyone's phase (a padded slot repeats the position before it)."""
    return (valid.long().cumsum(dim=1) - 1).clamp(min=0)


def prefix_lm_pass(
    backbone: nn.Module,
    source: Tensor,
    source_mask: Tensor,
    target: Tensor,
    target_mask: Tensor,
    *,
    cache=None,
    routing: dict | None = None,
) -> Tensor:
    """The backbone over ``[source][target]``: bidirectional over the source, causal over the
    target; sources never see targets.

    Args:
        source: (B, Ns, D) projected source tokens; source_mask (B, Ns) True on real ones.
        target: (B, Lt, D) embedded target tokens; target_mask (B, Lt).
        cache: a backbone KV cache to fill (generation prefill), or None.
        routing: extra backbone arguments for a backbone that routes by modality
            (``ModalityRouting.options``); None or empty for any other.

    Returns:
        (B, Ns + Lt, D) final states.
    """
    tokens = torch.cat([source, target], dim=1)  # (B, Ns + Lt, D)
    valid = torch.cat([source_mask, target_mask], dim=1)
    is_target = torch.zeros_like(valid)
    is_target[:, source.shape[1] :] = True
    mask = prefix_lm_mask(is_target, valid)
    return backbone(tokens, mask=mask, positions=real_positions(valid), cache=cache, **(routing or {}))


def source_pass(backbone: nn.Module, tokens: Tensor, valid: Tensor, *, routing: dict | None = None) -> Tensor:
    """The backbone over one modality's tokens alone, bidirectionally: (B, N, D) -> (B, N, D).

    Keys are the real tokens only; every token may attend itself, so a padded row is never fully
    masked (an all-False softmax row is NaN) while real rows are unaffected. Because sources never
    attend targets in ``prefix_lm_pass``, its source positions hold exactly these states.
    """
    eye = torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)  # (N, N)
    attend = (valid[:, None, :] | eye)[:, None]  # (B, 1, N, N)
    return backbone(tokens, mask=attend, positions=real_positions(valid), **(routing or {}))


def masked_mean(hidden: Tensor, valid: Tensor) -> Tensor:
    """(B, N, D) states, (B, N) bool -> (B, D) mean over the real tokens."""
    weights = valid.to(hidden.dtype)[:, :, None]  # (B, N, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
