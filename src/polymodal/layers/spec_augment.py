"""SpecAugment: random frequency bands and time spans of a log-mel batch masked while training.

Reference: Park et al. 2019, "SpecAugment" (arXiv:1904.08779), frequency and time masking (time
warping left out). Each masked region is filled with the item's mean log-mel over its real frames,
the value zero takes after the per-utterance mean normalisation of the paper. Written here rather
than taken from torchaudio (whose ``FrequencyMasking``/``TimeMasking`` are not usable on this
project's machines, see the developers' guide) and because it must respect the padding mask: a
time mask lies inside an item's real frames, and padded frames are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SpecAugment(nn.Module):
    """(B, F, M) log-mel -> the same with ``freq_masks`` bands and ``time_masks`` spans masked per item.

    Identity in eval mode or with no masks. Widths are drawn uniformly in [0, max width] and starts
    uniformly where the mask fits, independently per item and mask, from torch's global generator
    (so a seeded run is reproducible).

    Args:
        freq_masks: bands masked per item.
        freq_mask_width: the widest band, in mel bins.
        time_masks: spans masked per item.
        time_mask_width: the longest span, in frames (cut to the item's length).
    """

    def __init__(self, *, freq_masks: int = 0, freq_mask_width: int = 8, time_masks: int = 0, time_mask_width: int = 8) -> None:
        super().__init__()
        for name, value in (("freq_masks", freq_masks), ("freq_mask_width", freq_mask_width),
                            ("time_masks", time_masks), ("time_mask_width", time_mask_width)):  # fmt: skip
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.freq_masks, self.freq_mask_width = freq_masks, freq_mask_width
        self.time_masks, self.time_mask_width = time_masks, time_mask_width

    @property
    def active(self) -> bool:
        return self.training and (self.freq_masks > 0 or self.time_masks > 0)

    def forward(self, mels: Tensor, mask: Tensor | None = None) -> Tensor:
        """mels (B, F, M), mask (B, F) True on real frames (None: all real) -> (B, F, M)."""
        if not self.active:
            return mels
        batch, frames, bands = mels.shape
        lengths = mask.sum(1) if mask is not None else torch.full((batch,), frames, device=mels.device)  # (B,)
        real = mask[:, :, None].to(mels.dtype) if mask is not None else torch.ones_like(mels[:, :, :1])
        fill = (mels * real).sum((1, 2)) / (real.sum((1, 2)) * bands).clamp(min=1)  # (B,) item mean
        hidden = torch.zeros(batch, frames, bands, dtype=torch.bool, device=mels.device)
        bins = torch.arange(bands, device=mels.device)
        for _ in range(self.freq_masks):
            hidden |= _spans(bins, torch.full_like(lengths, bands), self.freq_mask_width)[:, None, :]
        steps = torch.arange(frames, device=mels.device)
        for _ in range(self.time_masks):
            hidden |= _spans(steps, lengths, self.time_mask_width)[:, :, None]
        if mask is not None:
            hidden &= mask[:, :, None]
        return torch.where(hidden, fill[:, None, None].to(mels.dtype), mels)


def _spans(index: Tensor, lengths: Tensor, max_width: int) -> Tensor:
    """(B, len(index)) bool: per item one span of width U[0, min(max_width, length)] inside [0, length)."""
    widths = (torch.rand(lengths.shape, device=index.device) * (torch.clamp(lengths, max=max_width) + 1)).floor().long()
    starts = (torch.rand(lengths.shape, device=index.device) * (lengths - widths + 1)).floor().long()
    return (index[None] >= starts[:, None]) & (index[None] < (starts + widths)[:, None])
