"""Durations of a target's frames per source token, found by monotonic alignment search over the
tokens' states: the part the ``mas_mel`` (speech: log-mel frames) and ``mas_vq`` (images: pixel
columns) heads share.

Each source token's state gives ``states_per_token`` mean frames in order (``prior_head``, a linear
layer: the states of a left-to-right HMM word model); MAS (``alignment_search.py``) finds the
monotonic alignment of the item's own frames to those means under unit-variance Gaussians, with
RAD-TTS's diagonal prior at weight ``alignment_prior``, and a token's duration is the count of its
states' frames. The prior term (the frames' squared distance to their state's mean, Grad-TTS's
encoder loss) is what makes the means, and so the alignment, mean something. With an edge frame,
the first and last real tokens ([bos] and [eos] as the collator adds them) have that one mean
instead of learned ones: their states see the whole text, and learned means let them take any
word's frames.

References: Kim et al. 2020, Glow-TTS, arXiv:2005.11129; Popov et al. 2021, Grad-TTS,
arXiv:2105.06337; Badlani et al. 2021, arXiv:2108.10447.
"""

from __future__ import annotations

import logging

import torch
from einops import rearrange
from torch import Tensor, nn

from polymodal.heads.alignment_search import diagonal_log_prior, gaussian_log_likelihood, maximum_path, uniform_durations

logger = logging.getLogger(__name__)

# What a state of an inner token pays, in log-likelihood, for each margin frame it takes: far more
# than any frame's likelihood differs, yet finite, so an item that is all margin still aligns.
MARGIN_PENALTY = 1.0e4


class TokenStateAlignment:
    """Mixin for a head with ``prior_head`` (D -> states_per_token * M), ``states_per_token`` and
    ``alignment_prior``."""

    prior_head: nn.Module
    states_per_token: int
    alignment_prior: float

    def state_means(self, states: Tensor, source_mask: Tensor, edge_frame: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """What MAS aligns the frames to: each real token's ``states_per_token`` mean frames in
        order; with an ``edge_frame`` (broadcast to (B, 1, M)), that one frame for the first and
        last real tokens. Returns the means (B, S, M), their mask (B, S), real states first, and
        each state's token (B, S)."""
        k, (batch, num_tokens) = self.states_per_token, source_mask.shape
        means = rearrange(self.prior_head(states), "b n (k m) -> b n k m", k=k)
        count = source_mask.long() * k  # (B, Ns) states per token
        if edge_frame is not None:
            position = torch.arange(num_tokens, device=source_mask.device)
            edge = source_mask & ((position == 0) | (position == source_mask.sum(1, keepdim=True) - 1))
            count = torch.where(edge, 1, count)
        ends = count.cumsum(1)  # (B, Ns) each token's last state + 1
        slot = torch.arange(int(ends[:, -1].max()), device=source_mask.device)  # (S,)
        owner = torch.searchsorted(ends, slot.expand(batch, -1).contiguous(), right=True).clamp(max=num_tokens - 1)
        mask = slot < ends[:, -1:]  # (B, S)
        state = (slot - (ends - count).gather(1, owner)).clamp(0, k - 1)  # (B, S) index among its token's states
        picked = means[torch.arange(batch, device=means.device)[:, None], owner, state]  # (B, S, M)
        if edge_frame is not None:
            picked = torch.where(edge.gather(1, owner)[:, :, None], edge_frame.to(picked.dtype), picked)
        return picked, mask, owner

    def align(self, means: Tensor, source_mask: Tensor, frames: Tensor, frame_mask: Tensor, bias: Tensor | None = None) -> Tensor:
        """(B, S, F) 0/1 path of the item's frames (B, F, M) to the means (B, S, M) of its tokens'
        states (``state_means``; mask (B, S)) by MAS, with the diagonal prior at weight
        ``alignment_prior`` and ``bias`` (B, S, F) added to the log-likelihoods when given; items
        with fewer frames than states get even durations instead (the first such batch logged as a
        warning, later ones at debug level with the running count: in the `generation` preset about
        every second step has one, which flooded the log)."""
        lengths, counts = source_mask.sum(1), frame_mask.sum(1)
        fits = counts >= lengths  # (B,)
        path = torch.zeros(*means.shape[:2], frames.shape[1], device=means.device)
        if fits.any():
            mask = source_mask[fits][:, :, None] & frame_mask[fits][:, None, :]
            value = gaussian_log_likelihood(means[fits], frames[fits])  # (b, Ns, F)
            if self.alignment_prior > 0:
                value = value + self.alignment_prior * diagonal_log_prior(lengths[fits], counts[fits], *value.shape[1:])
            if bias is not None:
                value = value + bias[fits]
            path[fits] = maximum_path(value, mask)
        if not fits.all():
            short, before = int((~fits).sum()), getattr(self, "short_targets", 0)
            self.short_targets = before + short
            log = logger.warning if before == 0 else logger.debug
            log(
                "%d target(s) have fewer frames than states to align (tokens x states_per_token); they get even durations "
                "(%d so far; later ones are logged at debug level)", short, self.short_targets,
            )  # fmt: skip
            durations = uniform_durations(lengths[~fits], counts[~fits], means.shape[1])  # (b, Ns)
            ends = durations.cumsum(1)  # (b, Ns) each token's last frame + 1
            frame = torch.arange(frames.shape[1], device=means.device)
            owner = torch.searchsorted(ends, frame.expand(len(ends), -1).float().contiguous(), right=True)  # (b, F)
            path[~fits] = nn.functional.one_hot(owner.clamp(max=means.shape[1] - 1), means.shape[1]).transpose(1, 2).float()
            path[~fits] *= frame_mask[~fits][:, None, :]
        return path

    def aligned_durations(
        self, states: Tensor, source_mask: Tensor, frames: Tensor, frame_mask: Tensor, edge_frame: Tensor | None,
        margins: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """(durations (B, Ns) in frames, the prior term) for frames (B, F, M) under the source
        tokens' ``states`` (B, Ns, D) (``edge_frame`` as ``state_means``); the path carries no
        gradient. ``margins`` (B, F) marks frames that only the first and last tokens may take
        (any other state pays ``MARGIN_PENALTY`` a frame there)."""
        means, state_mask, owner = self.state_means(states, source_mask, edge_frame)
        bias = None
        if margins is not None:
            last = source_mask.sum(1, keepdim=True) - 1
            inner = (owner > 0) & (owner < last)  # (B, S) states of neither edge token
            bias = -MARGIN_PENALTY * (inner[:, :, None] & margins[:, None, :]).float()
        with torch.no_grad():
            path = self.align(means, state_mask, frames, frame_mask, bias)  # (B, S, F)
        aligned_means = torch.einsum("blf,blm->bfm", path, means.float())  # (B, F, M): each frame's state mean
        durations = torch.zeros(source_mask.shape, device=path.device).scatter_add_(1, owner, path.sum(-1))
        return durations, frame_prior_loss(aligned_means, frames, frame_mask)


def frame_prior_loss(aligned_means: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
    """Mean squared distance of the real frames (B, F, M) to their state's mean (B, F, M), an fp32
    island; the negative log-likelihood of unit Gaussians up to a constant and a factor 2."""
    error = (aligned_means.float() - frames.float()).square().where(frame_mask[:, :, None], 0.0)
    return error.sum() / (frame_mask.sum() * frames.shape[-1]).clamp(min=1)
