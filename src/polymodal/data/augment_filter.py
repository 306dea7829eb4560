"""FilterAugment: each training clip's log-mel frames coloured by a random gain across frequency, as
another microphone, room or talker's effort would colour the recording.

Nam, Kim and Park 2022, FilterAugment: An Acoustic Environmental Data Augmentation Method (ICASSP),
arXiv:2107.13260. The mel axis is cut into a drawn number of bands at drawn boundaries; a gain in
dB is drawn at every boundary (and at both ends), and the gain of each mel band is the straight
line between its neighbouring boundaries (the paper's "linear" type; its "step" type, one gain per
band, is left out: a microphone's response has no steps). The same curve is added to every frame
of the clip, so it changes the clip's spectral balance and nothing else: a steady tilt of 10 dB
between 1 and 4 kHz is about what tells two cheap microphones apart.

Why here: the leave-one-speaker-out folds of FSDD (BENCHMARKS.md) read one speaker's "six" and
"three" as "eight" because his recordings carry ten times the others' energy above 2.5 kHz; low-
passing his test clips at 2 kHz raised his "three" from 8% to 82%. Applied by the collator to log-
mel frames, before SpecAugment, from the item's own generator
(``augment.sample_rng(..., stream="filter_augment")``), so it replays on resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DB_TO_LOG_POWER = math.log(10.0) / 10.0  # log-mel frames are natural logs of power


def filter_gain(num_mels: int, rng: np.random.Generator, *, bands: tuple[int, int], db: tuple[float, float]) -> np.ndarray:
    """One clip's gain curve over the mel bands: (num_mels,) in dB.

    Args:
        num_mels: M, the mel bands.
        rng: the clip's generator.
        bands: (low, high), the number of bands n drawn uniformly from low..high (capped at M - 1).
        db: (low, high), each boundary's gain drawn uniformly from it.

    Returns:
        (M,) float64: piecewise linear, with n + 1 knots at 0, n - 1 distinct interior bands, M - 1.
    """
    n = min(int(rng.integers(bands[0], bands[1] + 1)), num_mels - 1)
    inner = np.sort(rng.choice(np.arange(1, num_mels - 1), size=n - 1, replace=False)) if n > 1 else np.empty(0, int)
    knots = np.concatenate([[0], inner, [num_mels - 1]])  # (n + 1,)
    gains = rng.uniform(db[0], db[1], size=knots.shape[0])  # (n + 1,)
    return np.interp(np.arange(num_mels), knots, gains)


def filter_augment(
    features: Tensor, mask: Tensor, rngs: Sequence[np.random.Generator], *, p: float, bands: tuple[int, int], db: tuple[float, float]
) -> Tensor:
    """Add each firing item's ``filter_gain`` curve to its real frames.

    Args:
        features: (B, F, M) log-mel frames.
        mask: (B, F) bool, True on real frames; padded frames are never written.
        rngs: one generator per item, so an item's curve does not depend on its batch.
        p: the probability that an item is filtered.
        bands, db: as ``filter_gain``.

    Returns:
        (B, F, M), a new tensor; ``features`` is left as it was.
    """
    if len(rngs) != features.shape[0]:
        raise ValueError(f"filter_augment needs one generator per item: {len(rngs)} for a batch of {features.shape[0]}")
    gains = torch.zeros(features.shape[0], features.shape[-1], dtype=features.dtype)  # (B, M)
    for b, rng in enumerate(rngs):
        fires = rng.random() < p  # always drawn, so the curve's draws do not depend on p
        if fires:
            gains[b] = torch.from_numpy(filter_gain(features.shape[-1], rng, bands=bands, db=db) * DB_TO_LOG_POWER)
    return features + gains[:, None, :] * mask[:, :, None].to(features.dtype)
