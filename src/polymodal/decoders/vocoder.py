"""Griffin-Lim vocoder: log-mel frames (as ``polymodal.data.audio.LogMel`` makes them) -> waveform.

Two steps, each undoing one step of ``LogMel``:

1. Mel -> linear power. The mel filterbank maps ``n_fft // 2 + 1`` bins to fewer bands, so many
   spectra give the same mel frame; we want a non-negative one. We start from each bin's share of
   the bands covering it and refine it with the multiplicative updates of Lee and Seung 2001,
   "Algorithms for Non-negative Matrix Factorization" (NIPS; no arXiv version), with the filterbank
   held fixed. They minimise the generalised KL divergence between the target and the re-projected
   mel energies and keep every bin non-negative. KL rather than least squares because it weighs
   each band by its relative error: a log-mel feature spans ~10 decades, and on a voiced test clip
   the clamped pseudo-inverse (and librosa's NNLS, which starts there) re-projects to a mean
   log-mel error of ~0.06 nats, these updates to ~0.001 after 50 steps.
2. Magnitude -> waveform by fast Griffin-Lim: Griffin and Lim 1984, "Signal Estimation from
   Modified Short-Time Fourier Transform" (IEEE TASSP 32(2); no arXiv version), with the momentum
   step of Perraudin, Balazs and Soendergaard 2013, "A Fast Griffin-Lim Algorithm" (IEEE WASPAA; no
   arXiv version).

Written here rather than taken from a library: librosa (a test-only dependency here) works on
numpy arrays one clip at a time, and torchaudio is not a dependency. This one is batched torch and
runs on the device the model's outputs are on. ``tests/decoders/test_vocoder.py`` checks it
against librosa's ``griffinlim`` and ``mel_to_audio``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch import Tensor, nn

from polymodal.data.audio import mel_filterbank

logger = logging.getLogger(__name__)

# Below this a magnitude, or a re-projected mel energy, counts as zero: a guard against 0 / 0.
_TINY = 1e-16
# Peak level of a written WAV: -1 dBFS leaves headroom so the 16-bit conversion never clips.
WAV_PEAK = 10.0 ** (-1.0 / 20.0)


class GriffinLimVocoder(nn.Module):
    """Log-mel frames -> waveform with no learned weights.

    The settings must be those of the ``LogMel`` that made the features (or that a model was
    trained to predict): the same filterbank, window and hop are inverted here.

    Args:
        sample_rate, n_fft, hop_length, num_mels, f_min, f_max: as in ``LogMel``.
        num_iters: Griffin-Lim iterations.
        momentum: Perraudin et al.'s alpha; 0 gives plain Griffin-Lim, 0.99 is their choice.
        mel_inverse_iters: multiplicative-update iterations of the mel -> linear inversion. 50 leaves
            ~0.001 nats of mel error, far below the ~0.07 that phase recovery leaves; past ~30 the
            round-trip error stops improving (measured on a voiced test clip).
        random_phase: start from uniform random phases, else from zero phase (as
            ``librosa.griffinlim(init=None)``); random starts usually converge further.
    """

    def __init__(
        self,
        *,
        sample_rate: int = 16000,
        n_fft: int = 400,
        hop_length: int = 160,
        num_mels: int = 64,
        f_min: float = 0.0,
        f_max: float | None = None,
        num_iters: int = 32,
        momentum: float = 0.99,
        mel_inverse_iters: int = 50,
        random_phase: bool = True,
    ) -> None:
        super().__init__()
        if num_iters < 1 or mel_inverse_iters < 0:
            raise ValueError(f"need num_iters >= 1 and mel_inverse_iters >= 0, got {num_iters}, {mel_inverse_iters}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.num_mels = num_mels
        self.num_iters = num_iters
        self.momentum = momentum
        self.mel_inverse_iters = mel_inverse_iters
        self.random_phase = random_phase
        filters = mel_filterbank(num_mels=num_mels, n_fft=n_fft, sample_rate=sample_rate, f_min=f_min, f_max=f_max)
        # Non-persistent: derived from the settings, as in LogMel.
        self.register_buffer("filters", filters, persistent=False)  # (n_fft//2+1, num_mels)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)  # as LogMel

    def mel_to_power(self, log_mel: Tensor) -> Tensor:
        """Non-negative linear power spectrum whose mel energies match ``exp(log_mel)``.

        Args:
            log_mel: (B, F, num_mels) natural-log mel power.

        Returns:
            (B, F, n_fft // 2 + 1) float32 power; bins no band covers are 0.
        """
        if log_mel.shape[-1] != self.num_mels:
            raise ValueError(f"expected (B, F, {self.num_mels}) log-mel frames, got {tuple(log_mel.shape)}")
        # fp32 island: exp of a bf16 log loses most digits, and the power spans ~10 decades.
        with torch.autocast(device_type=log_mel.device.type, enabled=False):
            filters = self.filters.float()  # (K, M), K = n_fft//2+1
            # Divide each frame by its loudest band: the updates below are scale-equivariant, and
            # this keeps every ratio far from fp32 under/overflow whatever the clip's level.
            log_mel = log_mel.float()
            log_peak = log_mel.amax(dim=-1, keepdim=True)  # (B, F, 1)
            mel = torch.exp(log_mel - log_peak)  # (B, F, M), in (0, 1]
            band_sums = filters.sum(dim=0)  # (M,): mel energy of a flat unit spectrum
            bin_sums = filters.sum(dim=1)  # (K,): how much the bands weigh each bin
            covered = bin_sums > 0
            # Start: each bin takes the flat-spectrum level of the bands covering it, weighted by them.
            share = filters / torch.where(covered, bin_sums, 1.0)[:, None]  # (K, M), rows sum to 1 or 0
            power = (mel / band_sums) @ share.T  # (B, F, K)
            for _ in range(self.mel_inverse_iters):
                # Lee-Seung KL update: power *= filters @ (mel / predicted) / bin_sums.
                predicted = (power @ filters).clamp_min(_TINY)  # (B, F, M)
                power = power * ((mel / predicted) @ filters.T) / torch.where(covered, bin_sums, 1.0)
            return power * torch.exp(log_peak)  # (B, F, K)

    def griffin_lim(
        self, magnitude: Tensor, *, length: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Fast Griffin-Lim: a waveform whose STFT magnitude is close to ``magnitude``.

        Each iteration projects onto the spectrograms with the wanted magnitude (keep the phase,
        swap in the magnitude), then onto the consistent ones (istft then stft), then extrapolates
        along the last step by ``momentum`` (Perraudin et al. 2013, algorithm 2).

        Args:
            magnitude: (B, n_fft // 2 + 1, F) linear STFT magnitude.
            length: samples to return; ``(F - 1) * hop_length`` when None.
            generator: for the random start phases (on ``magnitude``'s device).

        Returns:
            (B, T) float32 waveform.
        """
        # fp32 island: half-precision stft is unsupported on CPU and loses the quiet bins elsewhere.
        with torch.autocast(device_type=magnitude.device.type, enabled=False):
            magnitude = magnitude.float().contiguous()  # the layout of the spectra it scales
            window = self.window.float()

            def stft(waveform: Tensor) -> Tensor:  # (B, T) -> (B, K, F) complex, as LogMel frames it
                return torch.stft(
                    waveform, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.n_fft, window=window,
                    center=True, pad_mode="reflect", return_complex=True,
                )  # fmt: skip

            def istft(spec: Tensor, num_samples: int | None = None) -> Tensor:  # (B, K, F) complex -> (B, T)
                return torch.istft(
                    spec, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.n_fft, window=window,
                    center=True, length=num_samples,
                )  # fmt: skip

            def with_magnitude(spec: Tensor) -> Tensor:  # keep the phase of spec, impose the target magnitude
                # On the (re, im) pairs, in real arithmetic: the complex division and the promotion
                # of the real factor to complex took half of the loop's time.
                pairs = torch.view_as_real(spec)  # (B, K, F, 2)
                scale = magnitude / torch.linalg.vector_norm(pairs, dim=-1).clamp_min(_TINY)  # target / |spec|
                return torch.view_as_complex(pairs * scale[..., None])

            if self.random_phase:
                where = magnitude.device if generator is None else generator.device  # a CPU generator on a GPU
                angles = torch.rand(magnitude.shape, generator=generator, device=where).to(magnitude.device) * (2 * math.pi)
                estimate = torch.polar(torch.ones_like(magnitude), angles)  # (B, K, F) complex
            else:
                estimate = torch.ones_like(magnitude, dtype=torch.complex64)
            previous = None
            # Iterate at the natural length, (F - 1) * hop_length samples, so that every stft gives back
            # exactly F frames; ``length`` only trims or pads the final waveform.
            for _ in range(self.num_iters):
                consistent = stft(istft(with_magnitude(estimate)))  # (B, K, F)
                # First step has nothing to extrapolate from: plain Griffin-Lim. Otherwise
                # consistent + momentum (consistent - previous), in place in the spent ``previous``.
                estimate = consistent if previous is None else previous.mul_(-self.momentum).add_(consistent, alpha=1 + self.momentum)
                previous = consistent
            return istft(with_magnitude(estimate), length)

    def forward(
        self, log_mel: Tensor, *, length: int | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Waveforms from log-mel frames.

        Args:
            log_mel: (B, F, num_mels) natural-log mel power, as ``LogMel`` returns.
            length: samples to return; ``(F - 1) * hop_length`` when None (``LogMel`` of a clip of T
                samples has ``1 + T // hop_length`` frames).
            generator: for the random start phases.

        Returns:
            (B, T) float32 waveform.
        """
        power = self.mel_to_power(log_mel)  # (B, F, K)
        magnitude = power.clamp_min(0.0).sqrt().transpose(1, 2)  # (B, F, K) -> (B, K, F); LogMel uses power 2
        return self.griffin_lim(magnitude, length=length, generator=generator)


def write_wav(path: str | Path, waveform: Tensor | np.ndarray, sample_rate: int) -> Path:
    """Write one mono clip as 16-bit PCM WAV, peak-normalised to ``WAV_PEAK`` (-1 dBFS).

    A silent clip is written as silence.

    Args:
        path: the file to write; parent folders are created.
        waveform: (T,) samples.
        sample_rate: in Hz.

    Returns:
        The path written.
    """
    samples = waveform.detach().float().cpu().numpy() if isinstance(waveform, Tensor) else np.asarray(waveform)
    samples = samples.astype(np.float64)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"expected a non-empty (T,) waveform, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise ValueError("waveform has NaN or infinite samples")
    peak = np.abs(samples).max()
    if peak > 0:
        samples = samples * (WAV_PEAK / peak)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, sample_rate, subtype="PCM_16")
    logger.info("wrote %.2f s of audio to %s", samples.size / sample_rate, path)
    return path
