"""The length regulator of the text -> image and text -> audio decoders, and their duration heads'
loss and prediction (FastSpeech, Ren et al. 2019, arXiv:1905.09263, section 3.2).

A source token with duration d covers d units of the target (log-mel frames, pixel columns); the
regulator gives each target token the source token its centre falls in, and which of
``PHASE_BUCKETS`` equal parts of that token. Durations are learned as log(1 + d).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


# Where in its source token a target token lies, in this many equal parts of the token.
PHASE_BUCKETS = 8


def align_frames(durations: Tensor, step: float, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The length regulator: which source token each target token reads, and where in it.

    Target token j covers [j step, (j + 1) step) of the target and reads the source token whose
    span holds its centre (j + 1/2) step; tokens of zero duration are never read, and a target
    token past an item's end reads that item's last token of nonzero duration.

    Args:
        durations: (B, L) per source token, >= 0 (0 on padding), in the target's units.
        step: the target's units per target token (log-mel frames, or pixel columns).
        count: J, the target tokens to make.

    Returns:
        index (B, J) long into L; phase (B, J) long in [0, PHASE_BUCKETS): the part of its source
        token the centre falls in; inside (B, J): True before the item's end (token 0 always).
    """
    durations = durations.float()
    ends = durations.cumsum(dim=1)  # (B, L) where each token's span ends
    totals = ends[:, -1]  # (B,)
    centres = (torch.arange(count, device=durations.device, dtype=ends.dtype) + 0.5) * step  # (J,)
    index = torch.searchsorted(ends.contiguous(), centres.expand(len(ends), -1).contiguous(), right=True)
    positions = torch.arange(durations.shape[1], device=durations.device)
    last = ((durations > 0) * positions).amax(dim=1, keepdim=True)  # (B, 1)
    index = torch.minimum(index, last)  # (B, J)
    length = durations.gather(1, index)
    start = ends.gather(1, index) - length
    phase = ((centres - start) / length.clamp(min=1e-6) * PHASE_BUCKETS).floor().long().clamp(0, PHASE_BUCKETS - 1)
    inside = centres[None, :] < totals[:, None]
    inside[:, 0] = True
    return index, phase, inside


def gather_tokens(source: Tensor, index: Tensor) -> Tensor:
    """(B, N, D) tokens at (B, J) indices -> (B, J, D)."""
    return source.gather(1, index[:, :, None].expand(-1, -1, source.shape[-1]))


def regulated_tokens(source: Tensor, durations: Tensor, phase_embed: nn.Embedding, step: int, max_tokens: int) -> tuple[Tensor, Tensor]:
    """Target tokens from the length regulator: one per ``step`` target units, a copy of the source
    token its centre falls in plus ``phase_embed`` of where in that token.

    Args:
        source: (B, Ns, D) source tokens; durations (B, Ns) in target units, 0 on padding.
        step: target units per target token; max_tokens: J at most.

    Returns:
        tokens (B, J, D) and their mask (B, J), True before each item's end (token 0 always);
        J = ceil(longest item / step), between 1 and ``max_tokens``.
    """
    count = min(max(math.ceil(float(durations.sum(1).max()) / step), 1), max_tokens)
    index, phase, inside = align_frames(durations, step, count)
    return gather_tokens(source, index) + phase_embed(phase), inside


def duration_loss(head: nn.Module, states: Tensor, mask: Tensor, durations: Tensor) -> Tensor:
    """Squared error of ``head``'s log(1 + duration) over the real source tokens (an fp32 island)."""
    error = (head(states).squeeze(-1).float() - torch.log1p(durations.float())).square().where(mask, 0.0)
    return error.sum() / mask.sum().clamp(min=1)


def predicted_durations(head: nn.Module, trunk, source: Tensor, source_mask: Tensor) -> Tensor:
    """(B, Ns) durations from ``head`` over ``trunk``'s pass over the source alone (the states the
    training pass gives the source), 0 on padding."""
    log_durations = head(trunk.source_states(source, source_mask)).squeeze(-1).float()
    return torch.expm1(log_durations).clamp(min=0.0).where(source_mask, 0.0)
