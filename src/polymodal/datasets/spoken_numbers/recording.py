"""How the built-in training speech is "recorded": each clean espeak-ng utterance of the training
split is played by a talker of another size and pace, in a room, through a microphone and a
channel, as real recordings are. Validation and test speech stay clean.

Why. A model trained on clean synthetic speech read real spoken digits at chance (12.7%, issue 12):
real recordings (the Free Spoken Digit Dataset, telephone prompts) are band-limited to 4 kHz,
start and end in room noise rather than digital silence, sit 10-20 dB lower, and come from vocal
tracts of other lengths. Each of those is simulated here, drawn per utterance from its own seed:

1. talker: speed perturbation by resampling (tempo, pitch and formants move together, as a
   shorter or longer vocal tract and a faster or slower talker would; Ko et al. 2015, Audio
   Augmentation for Speech Recognition, Interspeech), never past ``MAX_SECONDS`` in all;
2. silence before and after the words (the recording starts before the talker does);
3. room: reverberation from a synthetic impulse response (exponentially decaying noise tail;
   Ko et al. 2017, ICASSP);
4. noise: white or pink at a drawn SNR (Snyder et al. 2018, MUSAN-style additive noise);
5. channel: band-limited through 8 kHz sampling (a telephone line or an 8 kHz recording);
6. level: a gain of -20..0 dB;
7. microphone: a spectral tilt of a few dB per octave about 1 kHz and a first-order high-pass
   (small microphones lose the bass; their response is rarely flat).

Steps 1 and 3-6 are ``polymodal.data.augment_audio``'s transforms, the same code a training run's
``data.augment`` uses; here they run once, when the data is built, so their cost is paid once per
cache entry (about 2 ms per utterance) rather than every epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from polymodal.data.augment_audio import AudioAugmentSettings, augment_waveform

MAX_SECONDS = 2.0  # the data config's default crop: a recording never outgrows it
SILENCE_S = (0.0, 0.25)  # silence drawn before and after the words, each
TALKER = AudioAugmentSettings(speed_p=1.0, speed_range=(0.85, 1.15))
ROOM_AND_CHANNEL = AudioAugmentSettings(
    reverb_p=0.3,
    reverb_rt60=(0.1, 0.5),
    reverb_drr_db=(3.0, 15.0),
    noise_p=0.8,
    noise_snr_db=(5.0, 40.0),
    noise_weights=(1.0, 1.0, 0.0),  # white and pink
    band_limit_p=0.5,
    band_limit_rate=8000,
    gain_p=1.0,
    gain_db=(-20.0, 0.0),
)
TILT_DB_PER_OCTAVE = (-3.0, 3.0)
TILT_PIVOT_HZ = 1000.0
HIGHPASS_HZ = (50.0, 300.0)  # the first-order high-pass's corner


def microphone(waveform: np.ndarray, sample_rate: int, *, tilt_db: float, highpass_hz: float) -> np.ndarray:
    """``waveform`` (T,) through a tilted, high-passed response, applied in the frequency domain.

    Gain at frequency f: ``tilt_db`` dB per octave away from ``TILT_PIVOT_HZ`` (0 dB there), times a
    first-order high-pass's magnitude ``(f / fc) / sqrt(1 + (f / fc)^2)``. Zero phase; DC removed.
    The FFT runs at the next FFT-friendly length (zero padding; any length's FFT is 5-10x slower).
    """
    from scipy.fft import next_fast_len  # imported here: scipy takes a second to load

    length = next_fast_len(waveform.shape[0], real=True)
    spectrum = np.fft.rfft(waveform, n=length)  # (L//2 + 1,)
    freqs = np.fft.rfftfreq(length, d=1.0 / sample_rate)
    octaves = np.log2(np.maximum(freqs, 1.0) / TILT_PIVOT_HZ)
    ratio = freqs / highpass_hz
    gain = 10.0 ** (tilt_db * octaves / 20.0) * ratio / np.sqrt(1.0 + ratio**2)
    return np.fft.irfft(spectrum * gain, n=length)[: waveform.shape[0]]


def record(waveform: np.ndarray, sample_rate: int, seed: int) -> np.ndarray:
    """One clean utterance (T,) float32 as recorded under conditions drawn from ``seed``.

    Returns:
        (T',) float32 in [-1, 1], at most ``MAX_SECONDS`` long unless the clean input already was.
    """
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
    limit = max(int(MAX_SECONDS * sample_rate), waveform.shape[0])
    x = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
    sped = augment_waveform(x, TALKER, rngs[0], sample_rate=sample_rate)
    if sped.shape[0] > limit:  # too slow to fit: keep the clean pace
        sped = x
    room = limit - sped.shape[0]
    lead, trail = (int(rngs[1].uniform(*SILENCE_S) * sample_rate) for _ in range(2))
    lead = min(lead, room)
    trail = min(trail, room - lead)
    padded = torch.nn.functional.pad(sped, (lead, trail))
    x = augment_waveform(padded, ROOM_AND_CHANNEL, rngs[2], sample_rate=sample_rate).double().numpy()
    tilt, highpass = rngs[3].uniform(*TILT_DB_PER_OCTAVE), rngs[3].uniform(*HIGHPASS_HZ)
    x = microphone(x, sample_rate, tilt_db=tilt, highpass_hz=highpass)
    peak = float(np.max(np.abs(x)))
    if peak > 1.0:
        x = x / peak  # scale, never clip (as augment_audio does)
    return x.astype(np.float32)
