"""Audio augmentation: per-waveform transforms of a raw clip, and SpecAugment on log-mel frames.

Waveform chain, each step with its own probability, in the order sound meets them on its way to a
recording: the talker (speed), the room (reverberation), the room's noise (additive noise at a
drawn SNR), the channel (band-limiting through a telephone rate), the recording level (gain).
A clip that ends above full scale is scaled down to a peak of 1 rather than clipped: clipping adds
harmonics the clean data never has.

- Speed perturbation: resample by a factor f, so the clip plays f times faster (tempo and pitch
  both change). Ko et al. 2015, Audio Augmentation for Speech Recognition (Interspeech), used
  f in {0.9, 1.0, 1.1}; here f is drawn on a 1 % grid (``SPEED_GRID``) so the polyphase filter
  ``scipy.signal.resample_poly`` designs stays short.
- Reverberation: a synthetic room impulse response, a unit direct path followed by Gaussian noise
  whose envelope falls 60 dB over the drawn RT60 (the Sabine / Schroeder model of a diffuse tail;
  the same synthetic family as Ko et al. 2017, A Study on Data Augmentation of Reverberant Speech
  for Robust Speech Recognition, ICASSP), its energy set by a drawn direct-to-reverberant ratio.
- Noise: white, pink (1/f power, made by shaping white noise's spectrum) or a clip the caller
  loaded (MUSAN-style, Snyder et al. 2018, X-Vectors, ICASSP, add noise at 0-15 dB SNR).
- SpecAugment (Park et al. 2019, arXiv:1904.08779): frequency and time masks on (B, F, M) log-mel
  frames, drawn inside each item's real frames only. Time warping is left out: the paper found it
  the least useful of the three and the most costly.

Every draw comes from the ``numpy.random.Generator`` passed in (``augment.sample_rng``), so a
clip's augmentation is a function of (seed, epoch, item index) alone and replays on resume. Each
transform draws from its own child generator, so turning one on or off leaves the others' draws.
Computed in float64 (filters and SNR arithmetic), returned as float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from polymodal.errors import ConfigError

SPEED_GRID = 100  # speed factors are k / SPEED_GRID: resample_poly's filter grows with the ratio's terms
# An envelope that falls 60 dB over RT60 is exp(-t * ln(10^3) / RT60) in amplitude.
RT60_DECAY = math.log(1000.0)
NOISE_KINDS = ("white", "pink", "clip")
AUDIO_TRANSFORMS = ("speed", "reverb", "noise", "band_limit", "gain")  # chain order


@dataclasses.dataclass(frozen=True)
class AudioAugmentSettings:
    """What happens to each training waveform. Every transform is off (probability 0) until set.

    Ranges are (low, high) and drawn uniformly.
    """

    speed_p: float = 0.0
    speed_range: tuple[float, float] = (0.9, 1.1)  # Ko et al. 2015's factors
    reverb_p: float = 0.0
    reverb_rt60: tuple[float, float] = (0.2, 0.8)  # seconds: small office to living room
    # Direct-to-reverberant ratio in dB: about 0-10 dB for a talker 1-2 m from the microphone.
    reverb_drr_db: tuple[float, float] = (0.0, 10.0)
    noise_p: float = 0.0
    noise_snr_db: tuple[float, float] = (5.0, 20.0)  # Snyder et al. 2018 use 0-15; digits are short
    # Relative odds of white, pink and clip noise; the clip odds count only when clips are given.
    noise_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    band_limit_p: float = 0.0
    band_limit_rate: int = 8000  # Hz: a narrow-band telephone channel keeps < 4 kHz
    gain_p: float = 0.0
    gain_db: tuple[float, float] = (-6.0, 6.0)
    # SpecAugment, Park et al. 2019, Table 1's SwitchBoard "mild" policy (SM): F=15, m_F=2, T=70,
    # p=0.2, m_T=2. Applied to log-mel frames by ``spec_augment``, not by ``augment_waveform``.
    # On the built-in spoken numbers even narrower masks hurt (BENCHMARKS.md, the clip preset):
    # a one-digit clip is ~0.4 s, and one masked span can hide the only difference between two.
    spec_augment_p: float = 0.0
    freq_masks: int = 2
    freq_mask_width: int = 15  # F: each mask covers up to this many mel bins
    time_masks: int = 2
    time_mask_width: int = 70  # T: each mask covers up to this many frames ...
    time_mask_fraction: float = 0.2  # p: ... and at most this share of the item's real frames
    # Vocal tract length perturbation (Jaitly & Hinton 2013; ``augment_vtlp``): the mel filterbank
    # read at frequencies warped by a factor from vtlp_range, bent above vtlp_boundary_hz (their
    # f_hi) to keep Nyquist. Applied by the collator to log-mel frames, not by ``augment_waveform``.
    vtlp_p: float = 0.0
    vtlp_range: tuple[float, float] = (0.9, 1.1)  # the paper's factors
    vtlp_boundary_hz: float = 4800.0

    def __post_init__(self) -> None:
        where = "data.augment.audio"
        for field in dataclasses.fields(self):
            if field.name.endswith("_p") and not 0.0 <= getattr(self, field.name) <= 1.0:
                raise ConfigError(f"{where}.{field.name}={getattr(self, field.name)}: a probability, in [0, 1]")
        for name in ("speed_range", "reverb_rt60", "noise_snr_db", "gain_db", "reverb_drr_db", "vtlp_range"):
            low, high = getattr(self, name)
            if low > high:
                raise ConfigError(f"{where}.{name}={[low, high]}: low above high; give [low, high]")
        if min(self.speed_range[0], self.reverb_rt60[0], self.vtlp_range[0], self.vtlp_boundary_hz) <= 0.0:
            raise ConfigError(f"{where}: speed_range, reverb_rt60, vtlp_range and vtlp_boundary_hz must be positive")
        if min(self.noise_weights) < 0.0 or sum(self.noise_weights) <= 0.0:
            raise ConfigError(f"{where}.noise_weights={list(self.noise_weights)}: odds >= 0, not all 0")
        counts = ("freq_masks", "freq_mask_width", "time_masks", "time_mask_width", "band_limit_rate")
        for name in counts:
            if getattr(self, name) < 0:
                raise ConfigError(f"{where}.{name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.time_mask_fraction <= 1.0:
            raise ConfigError(f"{where}.time_mask_fraction={self.time_mask_fraction}: a share, in [0, 1]")

    @property
    def active(self) -> bool:
        """Whether any waveform transform can fire (SpecAugment aside)."""
        return any(getattr(self, f"{name}_p") > 0.0 for name in AUDIO_TRANSFORMS)


@functools.lru_cache(maxsize=64)
def resample_filter(up: int, down: int) -> np.ndarray:
    """The Kaiser-windowed low-pass ``resample_poly`` designs on each call for ``up / down``
    (cutoff at the lower Nyquist, 10 zero crossings each side), designed once: the design costs
    more than filtering a short clip."""
    from scipy.signal import firwin  # scipy imports here: scipy.signal takes a second to load

    max_rate = max(up, down)
    half_len = 10 * max_rate  # scipy's default filter length for resample_poly
    return firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """(T,) at ``rate_in`` -> (ceil(T * rate_out / rate_in),) at ``rate_out``, as ``resample_poly``."""
    from scipy.signal import resample_poly

    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    return resample_poly(x, up, down, window=resample_filter(up, down))


def change_speed(waveform: np.ndarray, factor: float) -> np.ndarray:
    """Play ``waveform`` (T,) ``factor`` times faster: (ceil(T / factor),) by polyphase resampling.

    ``factor`` is rounded to the ``SPEED_GRID`` (1 %); 1.0 returns the input unchanged.
    """
    steps = round(factor * SPEED_GRID)
    if steps == SPEED_GRID:
        return waveform.copy()
    return resample(waveform, steps, SPEED_GRID)  # T samples at rate k -> T * 100 / k at rate 100


def white_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(T,) standard Gaussian noise: a flat power spectrum."""
    return rng.standard_normal(num_samples)


def pink_noise(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """(T,) noise with power 1/f: white noise whose spectrum is scaled by 1/sqrt(f), DC removed.

    Made at the next FFT-friendly length and cut to T: an FFT of a length with a large prime
    factor (a clip's length is anything) runs 5-10x slower, and a stretch of noise is noise.
    """
    from scipy.fft import next_fast_len

    length = next_fast_len(num_samples, real=True)
    spectrum = np.fft.rfft(rng.standard_normal(length))  # (L//2+1,)
    freqs = np.fft.rfftfreq(length)
    shaping = np.zeros_like(freqs)
    shaping[1:] = 1.0 / np.sqrt(freqs[1:])  # amplitude 1/sqrt(f) is power 1/f
    pink = np.fft.irfft(spectrum * shaping, n=length)[:num_samples]
    return pink / max(float(np.sqrt(np.mean(pink**2))), np.finfo(np.float64).tiny)


def noise_clip(clip: np.ndarray, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random (T,) stretch of ``clip``, looped when the clip is shorter than T."""
    clip = np.asarray(clip, dtype=np.float64)
    start = int(rng.integers(0, clip.shape[0]))
    reps = -(-(start + num_samples) // clip.shape[0])  # ceil: enough copies to cover start + T
    return np.tile(clip, reps)[start : start + num_samples]


def add_noise(waveform: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``waveform + g * noise`` with g such that 10 log10(P_waveform / P_{g noise}) = ``snr_db``.

    A silent waveform (or silent noise) comes back unchanged: no SNR is defined.
    """
    signal_power = float(np.mean(waveform**2))
    noise_power = float(np.mean(noise**2))
    if signal_power == 0.0 or noise_power == 0.0:
        return waveform.copy()
    scale = math.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return waveform + scale * noise


def synthetic_impulse_response(
    sample_rate: int, rt60: float, drr_db: float, rng: np.random.Generator
) -> np.ndarray:
    """A room impulse response (round(rt60 * sample_rate),): 1 at t=0 (the direct path), then an
    exponentially decaying Gaussian tail that falls 60 dB by ``rt60`` seconds, scaled so that
    direct energy / tail energy = ``drr_db``."""
    length = max(2, round(rt60 * sample_rate))
    t = np.arange(1, length) / sample_rate  # tail times, after the direct sample
    tail = rng.standard_normal(length - 1) * np.exp(-RT60_DECAY * t / rt60)
    tail *= math.sqrt(10.0 ** (-drr_db / 10.0) / float(np.sum(tail**2)))
    return np.concatenate([[1.0], tail])


def reverberate(waveform: np.ndarray, impulse_response: np.ndarray) -> np.ndarray:
    """``waveform`` (T,) convolved with the response, cut back to T samples (the tail past the end
    of the clip is dropped so the clip keeps its length)."""
    from scipy.signal import fftconvolve

    return fftconvolve(waveform, impulse_response)[: waveform.shape[0]]


def band_limit(waveform: np.ndarray, sample_rate: int, channel_rate: int) -> np.ndarray:
    """Down to ``channel_rate`` and back up: what survives is below channel_rate / 2. (T,) -> (T,)."""
    if channel_rate >= sample_rate:
        return waveform.copy()
    narrow = resample(resample(waveform, sample_rate, channel_rate), channel_rate, sample_rate)
    out = np.zeros_like(waveform)
    keep = min(out.shape[0], narrow.shape[0])  # the round trip can be a sample off in length
    out[:keep] = narrow[:keep]
    return out


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _noise(
    num_samples: int, settings: AudioAugmentSettings, rng: np.random.Generator, clips: Sequence
) -> np.ndarray:
    weights = np.array(settings.noise_weights, dtype=np.float64)
    if not clips:
        weights[NOISE_KINDS.index("clip")] = 0.0
    if weights.sum() == 0.0:
        raise ConfigError("data.augment.audio.noise_weights asks for clip noise only, but no noise clips were given")
    kind = NOISE_KINDS[int(rng.choice(len(NOISE_KINDS), p=weights / weights.sum()))]
    if kind == "white":
        return white_noise(num_samples, rng)
    if kind == "pink":
        return pink_noise(num_samples, rng)
    return noise_clip(clips[int(rng.integers(0, len(clips)))], num_samples, rng)


def augment_waveform(
    waveform: Tensor,
    settings: AudioAugmentSettings,
    rng: np.random.Generator,
    *,
    sample_rate: int,
    noise_clips: Sequence[np.ndarray | Tensor] = (),
) -> Tensor:
    """Run the waveform chain (speed, reverb, noise, band-limit, gain) on one clip.

    Args:
        waveform: (T,) float in [-1, 1] at ``sample_rate``.
        settings: which transforms fire, with what probability and ranges.
        rng: this item's generator (``augment.sample_rng(..., stream="audio")``).
        sample_rate: the clip's rate in Hz.
        noise_clips: (T_i,) noise recordings at ``sample_rate`` for the "clip" noise kind.

    Returns:
        (T',) float32 in [-1, 1]; T' = T unless speed perturbation fired.
    """
    child_seeds = rng.integers(0, 2**63, size=len(AUDIO_TRANSFORMS))
    rngs = {name: np.random.default_rng(int(s)) for name, s in zip(AUDIO_TRANSFORMS, child_seeds)}
    fires = {name: rngs[name].random() < getattr(settings, f"{name}_p") for name in AUDIO_TRANSFORMS}
    x = waveform.detach().cpu().double().numpy()
    if fires["speed"]:
        x = change_speed(x, _uniform(rngs["speed"], settings.speed_range))
    if fires["reverb"]:
        r = rngs["reverb"]
        rt60, drr_db = _uniform(r, settings.reverb_rt60), _uniform(r, settings.reverb_drr_db)
        ir = synthetic_impulse_response(sample_rate, rt60, drr_db, r)
        x = reverberate(x, ir)
    if fires["noise"]:
        snr = _uniform(rngs["noise"], settings.noise_snr_db)
        x = add_noise(x, _noise(x.shape[0], settings, rngs["noise"], noise_clips), snr)  # noise_clip converts the one drawn
    if fires["band_limit"]:
        x = band_limit(x, sample_rate, settings.band_limit_rate)
    if fires["gain"]:
        x = x * 10.0 ** (_uniform(rngs["gain"], settings.gain_db) / 20.0)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 1.0:
        x = x / peak  # scale, never clip (see the module docstring)
    return torch.from_numpy(x.astype(np.float32))


def spec_augment(
    features: Tensor, mask: Tensor, settings: AudioAugmentSettings, rngs: Sequence[np.random.Generator]
) -> Tensor:
    """SpecAugment frequency and time masks, inside each item's real frames only.

    Masked cells take the item's mean over its real frames (Park et al. mask with 0 on
    mean-normalised features; our log-mel frames are not normalised, and their mean is what 0 is
    there). Padded frames are never read nor written.

    Args:
        features: (B, F, M) log-mel frames.
        mask: (B, F) bool, True on real frames.
        settings: ``spec_augment_p`` and the mask counts and widths.
        rngs: one generator per item (``augment.sample_rng(..., stream="spec_augment")``), so an
            item's masks do not depend on the batch it lands in.

    Returns:
        (B, F, M), a new tensor; ``features`` is left as it was.
    """
    if len(rngs) != features.shape[0]:
        raise ValueError(f"spec_augment needs one generator per item: {len(rngs)} for a batch of {features.shape[0]}")
    out = features.clone()
    num_mels = features.shape[-1]
    for b, rng in enumerate(rngs):
        if not rng.random() < settings.spec_augment_p:
            continue
        real = torch.nonzero(mask[b]).squeeze(1)  # (n,) indices of the real frames
        n = real.numel()
        if n == 0:
            continue
        fill = out[b, real].mean()
        for _ in range(settings.freq_masks):
            width = int(rng.integers(0, min(settings.freq_mask_width, num_mels) + 1))
            start = int(rng.integers(0, num_mels - width + 1))
            out[b, real, start : start + width] = fill
        max_width = min(settings.time_mask_width, int(settings.time_mask_fraction * n))
        for _ in range(settings.time_masks):
            width = int(rng.integers(0, max_width + 1))
            start = int(rng.integers(0, n - width + 1))
            out[b, real[start : start + width]] = fill
    return out
