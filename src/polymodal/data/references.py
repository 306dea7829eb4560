"""Aligned references: a rendering of a text (a recording, a drawing) with where each unit of the
text (a word, a character) lies in it, and the token durations that follow for a tokenizer.

A dataset that knows how its targets line up with their text (``polymodal.datasets``) gives each
label one ``Reference``; the collator turns them into ``AlignedTargets`` for heads that learn with
durations and a length regulator (Ren et al. 2019, FastSpeech, arXiv:1905.09263). Each unit covers
a span of the target; a unit's span is shared among its BPE tokens in proportion to their
characters, what lies before the first unit goes to ``[bos]`` and what lies after the last to
``[eos]``, so every source token gets a duration (log-mel frames, or pixel columns).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Reference:
    """One number's reference rendering.

    Attributes:
        text: the source text (the words spoken, or the digits drawn).
        value: (T,) float32 waveform in [-1, 1], or (H, W) uint8 image.
        units: [start, end) characters of each unit of ``text`` (a word, a digit).
        bounds: (U + 1,) int64, where each unit starts in ``value`` (sample or column), then where
            the last one ends.
        length: the extent of ``value`` (T samples or W columns).
    """

    text: str
    value: np.ndarray
    units: list[tuple[int, int]]
    bounds: np.ndarray
    length: int


def token_durations(reference: Reference, offsets: list[tuple[int, int]], scale: float) -> tuple[float, np.ndarray, float]:
    """How much of ``reference`` each token of its text covers, in units of ``scale``.

    Args:
        offsets: per token, its [start, end) characters in ``reference.text`` (a token's leading
            space belongs to the unit after it).
        scale: samples per log-mel frame, or 1 (pixel columns).

    Returns:
        lead (before the first unit: ``[bos]``'s), per token (len(offsets),) float64, and trail
        (after the last unit: ``[eos]``'s); together they sum to ``reference.length / scale``.
    """
    units, bounds = reference.units, reference.bounds.astype(np.float64)
    extent = np.diff(bounds).clip(min=0)  # (U,)
    # Unit of each token: the one holding the token's last character.
    unit_of = np.array([next(k for k, (_, stop) in enumerate(units) if end <= stop) for _, end in offsets])
    chars = np.array([max(end - max(start, units[k][0]), 1) for (start, end), k in zip(offsets, unit_of)], dtype=np.float64)
    per_unit = np.bincount(unit_of, weights=chars, minlength=len(units))  # characters per unit
    durations = extent[unit_of] * chars / per_unit[unit_of]
    return bounds[0] / scale, durations / scale, (reference.length - bounds[-1]) / scale
