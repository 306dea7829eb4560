"""Audio front end: read a clip, and turn waveforms into log-mel spectrogram frames.

Two optional clean-ups make clips recorded in different rooms look alike: ``LogMel(top_db=...)``
floors each clip's log-mel at its peak minus ``top_db`` (librosa's ``power_to_db(ref=np.max,
top_db=...)``, the 80 dB floor of Whisper's front end, Radford et al. 2022, arXiv:2212.04356), so a
quiet studio and a hissing laptop have the same floor; ``speech_bounds`` finds where a clip's sound
starts and ends (the leading and trailing frames within ``top_db`` of its loudest frame, as
``librosa.effects.trim``), so long silences around a word are cut.

The mel filterbank follows Slaney's Auditory Toolbox (Slaney 1998, Technical Report #1998-010):
the mel scale is linear below 1 kHz and logarithmic above, and each triangle is scaled to unit area
("slaney" normalisation). These are librosa's defaults, so ``mel_filterbank`` matches
``librosa.filters.mel`` and ``LogMel`` matches ``librosa.feature.melspectrogram`` (power 2,
Hann window, centred frames with reflect padding) followed by a natural log.

Audio files are untrusted input: a damaged file, a rate outside what any recording uses, no
samples, or a NaN sample is a ``DataError`` naming the path; a long file is read only as far as
``max_seconds`` (plus a margin for the resampling filter), so its length never decides the memory.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch import Tensor, nn

from polymodal.data.files import is_file
from polymodal.errors import DataError

logger = logging.getLogger(__name__)

# Slaney mel scale: linear (200/3 Hz per mel) up to 1 kHz, then log-spaced at log(6.4)/27 per mel.
SLANEY_HZ_PER_MEL = 200.0 / 3.0
SLANEY_BREAK_HZ = 1000.0
SLANEY_LOG_STEP = math.log(6.4) / 27.0
# Smallest mel power before the log (-100 dB): exact silence would otherwise give log(0) = -inf.
# librosa's power_to_db uses the same floor (amin=1e-10).
LOG_FLOOR = 1e-10
# Rates a file may declare: from telephone-grade 1 kHz to 768 kHz, the highest audio interfaces
# record at. Outside it the header is damaged, and resampling would build a filter of
# 20 * rate taps (scipy's resample_poly), gigabytes for a corrupt 2 GHz header.
MIN_FILE_RATE = 1_000
MAX_FILE_RATE = 768_000
# librosa.effects.trim's floor on a frame's RMS before it goes into dB (amplitude_to_db's amin):
# a run of exact zeros reads 100 dB below full scale, not -inf.
TRIM_AMIN = 1e-5
# Seconds read past ``max_seconds`` before resampling, so the kept samples are those of resampling
# the whole file: resample_poly's filter reaches 10 * max(1, file rate / wanted rate) input samples
# either side of an output sample, under 1,000 at any rate allowed here (1.3 ms at 768 kHz).
RESAMPLE_MARGIN_SECONDS = 0.1


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    break_mel = SLANEY_BREAK_HZ / SLANEY_HZ_PER_MEL
    log_part = break_mel + np.log(np.maximum(hz, SLANEY_BREAK_HZ) / SLANEY_BREAK_HZ) / SLANEY_LOG_STEP
    return np.where(hz >= SLANEY_BREAK_HZ, log_part, hz / SLANEY_HZ_PER_MEL)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    break_mel = SLANEY_BREAK_HZ / SLANEY_HZ_PER_MEL
    log_part = SLANEY_BREAK_HZ * np.exp(SLANEY_LOG_STEP * (mel - break_mel))
    return np.where(mel >= break_mel, log_part, mel * SLANEY_HZ_PER_MEL)


def mel_weights(hz: np.ndarray, *, num_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Each Slaney mel triangle (unit area) read at the frequencies ``hz`` (K,): (num_mels, K) float64.

    ``mel_filterbank`` reads them at the FFT bins; vocal tract length perturbation
    (``augment_vtlp``) at warped bins.
    """
    # num_mels + 2 edges: band i rises from edge i to its peak at edge i+1 and falls to edge i+2.
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), num_mels + 2))
    widths = np.diff(edges_hz)  # (num_mels + 1,)
    offsets = edges_hz[:, None] - np.asarray(hz, dtype=np.float64)[None, :]  # (num_mels + 2, K)
    rising = -offsets[:-2] / widths[:-1, None]  # (num_mels, K)
    falling = offsets[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return weights * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # unit area per triangle


def mel_filterbank(
    *, num_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular mel filters on the Slaney scale with unit-area (Slaney) normalisation.

    Computed in float64, returned as float32.

    Args:
        num_mels: number of mel bands.
        n_fft: FFT size; the filters act on its ``n_fft // 2 + 1`` frequency bins.
        sample_rate: in Hz.
        f_min: lowest band edge in Hz.
        f_max: highest band edge in Hz; ``sample_rate / 2`` when None.

    Returns:
        (n_fft // 2 + 1, num_mels): multiply a power spectrum (..., n_fft // 2 + 1) by it.
    """
    f_max = sample_rate / 2.0 if f_max is None else float(f_max)
    if not 0.0 <= f_min < f_max <= sample_rate / 2.0:
        raise ValueError(
            f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}, "
            f"sample_rate={sample_rate}"
        )
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)  # (n_fft//2+1,)
    weights = mel_weights(fft_hz, num_mels=num_mels, f_min=f_min, f_max=f_max)
    if np.any(weights.max(axis=1) == 0.0):
        logger.warning("some of the %d mel bands are empty; use fewer mels or a larger n_fft", num_mels)
    return torch.from_numpy(weights.T.copy()).float()


NORM_EPS = 1e-5  # added to a clip's log-mel variance (natural-log units squared; speech's is ~10)


def utterance_norm(mels: Tensor, mask: Tensor | None) -> Tensor:
    """Each clip's bands minus their mean over its real frames, over its std: (B, F, M) -> (B, F, M).
    The audio encoders' ``input_norm``, and ``data.speaker_norm``'s rule for a clip of no known speaker.

    fp32 island: a variance over ~200 frames x 64 bands loses its digits in bf16. Padded frames
    come back 0.
    """
    x = mels.float()
    weights = torch.ones_like(x[..., :1]) if mask is None else mask[..., None].float()  # (B, F, 1)
    count = weights.sum(1, keepdim=True).clamp(min=1)  # (B, 1, 1) real frames
    centered = (x - (x * weights).sum(1, keepdim=True) / count) * weights  # (B, F, M)
    var = centered.square().sum((1, 2), keepdim=True) / (count * x.shape[-1])  # (B, 1, 1)
    return (centered * torch.rsqrt(var + NORM_EPS)).to(mels.dtype)


class LogMel(nn.Module):
    """Waveforms -> natural-log mel power spectrogram, centred Hann-windowed STFT frames."""

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        num_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        top_db: float | None = None,
    ) -> None:
        super().__init__()
        if top_db is not None and top_db <= 0:
            raise ValueError(f"top_db must be > 0 dB (or None for no floor), got {top_db}")
        self.top_db = top_db
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.num_mels = num_mels
        # Non-persistent: derived from the settings, so they are not written into checkpoints.
        filters = mel_filterbank(num_mels=num_mels, n_fft=n_fft, sample_rate=sample_rate, f_min=f_min, f_max=f_max)
        self.register_buffer("filters", filters, persistent=False)  # (n_fft//2+1, num_mels)
        # Periodic Hann, as scipy's get_window("hann", n_fft) that librosa uses.
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def frame_lengths(self, num_samples: Tensor) -> Tensor:
        """Frames that ``forward`` yields for clips of these lengths on their own.

        With centred frames, frame t is centred on sample t * hop_length, and the clip gets
        ``1 + num_samples // hop_length`` of them. In a zero-padded batch the frames beyond that are
        padding; mask them.

        Args:
            num_samples: (B,) long, unpadded clip lengths.

        Returns:
            (B,) long.
        """
        return 1 + torch.div(num_samples, self.hop_length, rounding_mode="floor")

    def forward(self, waveforms: Tensor, filters: Tensor | None = None) -> Tensor:
        """Log-mel frames of a batch of waveforms.

        Clips shorter than ``n_fft // 2 + 1`` samples are zero-padded to that length first (reflect
        padding needs more samples than it pads).

        Args:
            waveforms: (B, T) float.
            filters: (B, n_fft // 2 + 1, num_mels), a filterbank per clip (a warped one, for
                ``augment_vtlp``); None uses ``self.filters`` for all.

        Returns:
            (B, 1 + T // hop_length, num_mels) float32, T counted after that padding; with
            ``top_db``, each clip's values are at least its maximum minus ``top_db`` dB (zero
            padding is quieter than any real frame, so it never sets a clip's maximum).
        """
        min_len = self.n_fft // 2 + 1
        if waveforms.shape[-1] < min_len:
            waveforms = nn.functional.pad(waveforms, (0, min_len - waveforms.shape[-1]))
        # fp32 island: mel power spans ~10 decades and goes into a log; in bf16/fp16 the small bins
        # round to 0 or lose all precision, and half-precision stft is unsupported on CPU anyway.
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            spec = torch.stft(
                waveforms.float(),
                n_fft=self.n_fft,
                hop_length=self.hop_length,
                win_length=self.n_fft,
                window=self.window.float(),
                center=True,
                pad_mode="reflect",
                return_complex=True,
            )  # (B, n_fft//2+1, F) complex
            power = spec.real.square() + spec.imag.square()  # (B, n_fft//2+1, F)
            if filters is None:
                mel = torch.einsum("bkf,km->bfm", power, self.filters.float())  # (B, F, num_mels)
            else:
                mel = torch.einsum("bkf,bkm->bfm", power, filters.float())
            log_mel = torch.log(torch.clamp(mel, min=LOG_FLOOR))
            if self.top_db is None:
                return log_mel
            # top_db dB of power is top_db / 10 decades, times ln(10) in natural-log units.
            floor = log_mel.amax(dim=(1, 2), keepdim=True) - self.top_db * math.log(10.0) / 10.0  # (B, 1, 1)
            return torch.maximum(log_mel, floor)


def speech_bounds(waveform: Tensor, *, top_db: float, frame_length: int, hop_length: int) -> tuple[int, int]:
    """Where the sound of a clip starts and ends: ``waveform[start:end]`` is it without its leading and
    trailing silence.

    Silence is any frame whose RMS is more than ``top_db`` dB below the clip's loudest frame; frames
    are ``frame_length`` samples, centred every ``hop_length`` samples on the clip zero-padded by
    ``frame_length // 2`` at both ends. This is ``librosa.effects.trim``'s rule, and its bounds.

    Args:
        waveform: (T,) float.
        top_db: how far below the loudest frame silence begins, in dB.
        frame_length: samples per RMS frame.
        hop_length: samples between frame centres.

    Returns:
        ``(start, end)``, 0 <= start < end <= T; ``(0, T)`` for an empty clip.
    """
    length = waveform.shape[0]
    if length == 0:
        return 0, 0
    half = frame_length // 2
    padded = nn.functional.pad(waveform.double()[None], (half, half))[0]  # (T + 2 * half,)
    frames = padded.unfold(0, frame_length, hop_length)  # (N, frame_length)
    rms = frames.square().mean(1).sqrt().clamp(min=TRIM_AMIN)  # (N,)
    loud = torch.nonzero(20.0 * torch.log10(rms / rms.max()) > -top_db).squeeze(1)  # never empty: the max is 0 dB
    start = int(loud[0]) * hop_length
    return start, max(start + 1, min(length, (int(loud[-1]) + 1) * hop_length))


def load_audio(path: str | Path, *, sample_rate: int, max_seconds: float | None = None) -> Tensor:
    """Read a WAV/FLAC (anything libsndfile reads), mix to mono, resample to ``sample_rate``.

    Args:
        path: the audio file.
        sample_rate: the rate wanted, in Hz.
        max_seconds: read at most this much of the file (the first seconds); None reads it all.

    Returns:
        (T,) float32 waveform, T <= ``max_seconds * sample_rate`` when given.

    Raises:
        DataError: naming the path, when the file is missing, unreadable, declares an implausible
            sample rate, or has no or non-finite samples.
    """
    path = Path(path)
    if not is_file(path):
        raise DataError(f"audio file {path} does not exist")
    try:
        info = soundfile.info(str(path))
        file_rate = int(info.samplerate)
        if not MIN_FILE_RATE <= file_rate <= MAX_FILE_RATE:
            raise DataError(
                f"audio file {path} declares {file_rate} Hz, outside {MIN_FILE_RATE}-{MAX_FILE_RATE} Hz: damaged header"
            )
        frames = -1 if max_seconds is None else math.ceil((max_seconds + RESAMPLE_MARGIN_SECONDS) * file_rate)
        data, file_rate = soundfile.read(str(path), frames=frames, dtype="float32", always_2d=True)  # (T, channels)
    except DataError:
        raise
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError, OSError, MemoryError) as exc:
        raise DataError(f"audio file {path} is corrupt or not a supported format (WAV, FLAC, OGG): {exc}") from None
    if data.shape[0] == 0:
        raise DataError(f"audio file {path} has no samples")
    if not np.isfinite(data).all():
        raise DataError(f"audio file {path} has NaN or infinite samples")
    mono = data.mean(axis=1)  # (T,)
    if file_rate != sample_rate:
        g = math.gcd(int(file_rate), int(sample_rate))
        from scipy.signal import resample_poly  # imported here: scipy.signal takes a second to load
        mono = resample_poly(mono, sample_rate // g, int(file_rate) // g).astype(np.float32)
    if max_seconds is not None:
        mono = mono[: int(round(max_seconds * sample_rate))]
    return torch.from_numpy(np.ascontiguousarray(mono))
