"""Vocal tract length perturbation (VTLP): each training clip's frequency axis stretched or squeezed
by a random factor, as a different talker's would be.

Jaitly & Hinton 2013, Vocal Tract Length Perturbation (VTLP) improves speech recognition (ICML
Workshop on Deep Learning for Audio, Speech and Language). Formants scale about inversely with the
length of the vocal tract, which is most of what tells two talkers apart in a spectrum; VTLP draws
a factor alpha per utterance (0.9-1.1 in the paper) and maps frequency f to

    w(f) = alpha * f                                             for f <= f_hi * min(alpha, 1) / alpha
    w(f) = nyq - (nyq - f_hi * min(alpha, 1)) / (nyq - f_hi * min(alpha, 1) / alpha) * (nyq - f)   above,

linear below the boundary and bent above it so that the Nyquist frequency ``nyq`` maps to itself
(the paper's f_hi is 4,800 Hz). Applied, as in the paper, to the mel filterbank: the clip's power at
FFT bin f is read by the filters as if it were at w(f), so the filterbank is the mel triangles
evaluated at the warped bins. Unlike speed perturbation (``augment_audio.change_speed``), tempo and
the clip's length are untouched.

The factor is drawn from the item's own generator (``augment.sample_rng(..., stream="vtlp")``), so it
replays on resume, and rounded to a ``WARP_GRID`` step so that a run builds few distinct filterbanks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from polymodal.data.audio import mel_weights

WARP_GRID = 200  # factors are k / WARP_GRID (0.5 % steps): finer than any talker difference matters


def vtlp_warp(hz: np.ndarray, alpha: float, *, boundary_hz: float, nyquist_hz: float) -> np.ndarray:
    """Jaitly & Hinton's piecewise-linear warp w(f) of frequencies ``hz`` (K,) -> (K,), in Hz.

    Monotonic, w(0) = 0 and w(nyquist) = nyquist; alpha = 1 is the identity.
    """
    hz = np.asarray(hz, dtype=np.float64)
    knee = boundary_hz * min(alpha, 1.0) / alpha  # where the linear part ends (input Hz)
    if knee >= nyquist_hz:  # the boundary sits above Nyquist: the warp is linear throughout
        return np.minimum(alpha * hz, nyquist_hz)
    slope = (nyquist_hz - boundary_hz * min(alpha, 1.0)) / (nyquist_hz - knee)
    return np.where(hz <= knee, alpha * hz, nyquist_hz - slope * (nyquist_hz - hz))


@functools.lru_cache(maxsize=256)
def warped_filterbank(
    alpha: float, *, num_mels: int, n_fft: int, sample_rate: int, boundary_hz: float
) -> Tensor:
    """The mel filterbank read at the VTLP-warped FFT bins: (n_fft // 2 + 1, num_mels) float32.

    Equal to ``audio.mel_filterbank`` (f_min 0, f_max Nyquist) at alpha = 1. Cached: a run draws
    factors on a grid, and building a filterbank costs more than applying it.
    """
    nyquist = sample_rate / 2.0
    bins_hz = np.linspace(0.0, nyquist, n_fft // 2 + 1)  # (n_fft//2+1,)
    warped = vtlp_warp(bins_hz, alpha, boundary_hz=boundary_hz, nyquist_hz=nyquist)
    weights = mel_weights(warped, num_mels=num_mels, f_min=0.0, f_max=nyquist)  # (num_mels, n_fft//2+1)
    return torch.from_numpy(weights.T.copy()).float()


def draw_warp(rng: np.random.Generator, *, p: float, low: float, high: float) -> float:
    """One item's factor: 1.0 unless VTLP fires (probability ``p``), else uniform in [low, high] on
    the ``WARP_GRID``. Always draws twice, so what follows in ``rng`` does not depend on ``p``."""
    fires, u = rng.random() < p, rng.uniform(low, high)
    return round(u * WARP_GRID) / WARP_GRID if fires else 1.0


def vtlp_filterbanks(
    alphas: Sequence[float], *, num_mels: int, n_fft: int, sample_rate: int, boundary_hz: float
) -> Tensor:
    """One warped filterbank per item, for ``LogMel(waveforms, filters)``: (B, n_fft // 2 + 1, num_mels)."""
    return torch.stack(
        [
            warped_filterbank(float(a), num_mels=num_mels, n_fft=n_fft, sample_rate=sample_rate, boundary_hz=boundary_hz)
            for a in alphas
        ]
    )
