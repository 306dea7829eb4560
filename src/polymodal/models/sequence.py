"""How token sequences go through the shared backbone: RoPE positions that count real tokens only,
one pass over ``[source][target]`` in the prefix-LM layout, one pass over a source alone, and the
masked mean that pools a source's states.

Both passes tell a backbone that can skip padding (``skips_padding = True``, as the transformer
does) which tokens are needed: the real source tokens and every target position (heads read the
states of padded target positions, which attend only themselves), but not the source's padding,
which no other token attends and whose states are only ever read through ``source_mask``.

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
    mask, positions, routing = prefix_lm_mask(is_target, valid), real_positions(valid), routing or {}
    if cache is not None:
        return backbone(tokens, mask=mask, positions=positions, cache=cache, **routing)
    return backbone(tokens, mask=mask, positions=positions, **routing, **needed_tokens(backbone, valid | is_target))


def source_pass(backbone: nn.Module, tokens: Tensor, valid: Tensor, *, routing: dict | None = None) -> Tensor:
    """The backbone over one modality's tokens alone, bidirectionally: (B, N, D) -> (B, N, D).

    Keys are the real tokens only; every token may attend itself, so a padded row is never fully
    masked (an all-False softmax row is NaN) while real rows are unaffected. Because sources never
    attend targets in ``prefix_lm_pass``, its source positions hold exactly these states.
    """
    return backbone(
        tokens, mask=source_attention(valid), positions=real_positions(valid), **(routing or {}),
        **needed_tokens(backbone, valid),
    )


def source_attention(valid: Tensor) -> Tensor:
    """(B, N) bool -> (B, 1, N, N) the mask of ``source_pass``: real keys, and every token itself."""
    eye = torch.eye(valid.shape[1], dtype=torch.bool, device=valid.device)  # (N, N)
    return (valid[:, None, :] | eye)[:, None]  # (B, 1, N, N)


def needed_tokens(backbone: nn.Module, needed: Tensor) -> dict[str, Tensor]:
    """``{"needed": needed}`` for a backbone that skips padding (``skips_padding``), else nothing."""
    return {"needed": needed} if getattr(backbone, "skips_padding", False) else {}


def masked_mean(hidden: Tensor, valid: Tensor) -> Tensor:
    """(B, N, D) states, (B, N) bool -> (B, D) mean over the real tokens."""
    weights = valid.to(hidden.dtype)[:, :, None]  # (B, N, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
