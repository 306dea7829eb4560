"""Griffin-Lim vocoder against librosa: mel inversion, phase recovery, log-mel round trip, pitch, WAV."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile
import torch

from polymodal.data.audio import LogMel, mel_filterbank
from polymodal.decoders.vocoder import WAV_PEAK, GriffinLimVocoder, write_wav

SAMPLE_RATE, N_FFT, HOP, NUM_MELS = 16000, 400, 160, 64  # the project's default audio front end
SETTINGS = dict(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, num_mels=NUM_MELS)
# Spectral convergence and log-mel error that 32 fast Griffin-Lim iterations reach on the test clip
# from its true STFT magnitude are ~0.07 and ~0.08 nats (measured; librosa's griffinlim lands at the
# same place). Phase recovery, not the mel inversion, sets the floor; the bounds allow ~2x.
MAX_SPECTRAL_CONVERGENCE = 0.15
MAX_LOG_MEL_ERROR = 0.15  # nats, mean over frames and bands: ~0.65 dB of mel power
# How much worse than librosa's own pipeline ours may be (different random start phases).
MARGIN = 0.02


def _voiced_clip(num_samples: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like test signal: a 150 Hz harmonic tone with vibrato and a 2 Hz envelope, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / SAMPLE_RATE
    f0 = 150.0 + 30.0 * np.sin(2 * np.pi * 3.0 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 20)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t))
    clip = tone + 0.05 * rng.standard_normal(num_samples)
    return (0.3 * clip / np.abs(clip).max()).astype(np.float32)


def _stft_magnitude(wave: np.ndarray) -> np.ndarray:
    """(K, F) magnitude, framed exactly as LogMel frames."""
    return np.abs(librosa.stft(wave, n_fft=N_FFT, hop_length=HOP, window="hann", center=True, pad_mode="reflect"))


def _spectral_convergence(target: np.ndarray, wave: np.ndarray) -> float:
    """||target - |STFT(wave)|||_F / ||target||_F (Sturmel and Daudet 2011), phase-blind."""
    rebuilt = _stft_magnitude(wave)[:, : target.shape[1]]
    return float(np.linalg.norm(target - rebuilt) / np.linalg.norm(target))


def _log_mel_error(log_mel: torch.Tensor, wave: np.ndarray | torch.Tensor) -> float:
    """Mean |LogMel(wave) - log_mel| over frames and bands, in nats."""
    wave = torch.as_tensor(np.asarray(wave, dtype=np.float32)).reshape(1, -1)
    again = LogMel(**SETTINGS)(wave)
    frames = min(again.shape[1], log_mel.shape[1])
    return (again[:, :frames] - log_mel[:, :frames]).abs().mean().item()


@pytest.mark.parametrize(("f_min", "f_max"), [(0.0, None), (300.0, 4000.0)])
def test_mel_inverse_reproduces_mel_energies(f_min: float, f_max: float | None) -> None:
    wave = _voiced_clip()
    settings = dict(SETTINGS, f_min=f_min, f_max=f_max)
    log_mel = LogMel(**settings)(torch.from_numpy(wave)[None])  # (1, F, M)
    vocoder = GriffinLimVocoder(**settings)
    power = vocoder.mel_to_power(log_mel)  # (1, F, K)
    filters = mel_filterbank(num_mels=NUM_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE, f_min=f_min, f_max=f_max)
    assert power.shape == (1, log_mel.shape[1], N_FFT // 2 + 1)
    assert (power >= 0).all()
    # Bins that no band covers get no energy.
    uncovered = filters.sum(dim=1) == 0
    assert (power[..., uncovered] == 0).all()
    ours = (torch.log(power @ filters) - log_mel).abs()  # (1, F, M) nats
    assert ours.mean() < 0.005 and ours.max() < 0.1
    # librosa's NNLS (least squares, clamped pseudo-inverse start) on the same mel power: ours must
    # be no worse, in the log domain the features live in.
    theirs_power = librosa.feature.inverse.mel_to_stft(
        log_mel[0].exp().T.double().numpy(), sr=SAMPLE_RATE, n_fft=N_FFT, power=1.0, fmin=f_min, fmax=f_max
    )  # (K, F); power=1 returns the power spectrum itself
    theirs = np.abs(np.log(np.maximum(theirs_power.T @ filters.double().numpy(), 1e-30)) - log_mel[0].double().numpy())
    assert ours.mean().item() <= theirs.mean() + 1e-6


# Relative L2 distance allowed between the two waveforms. Plain Griffin-Lim agrees to ~1e-5;
# momentum 0.99 extrapolates every step and so amplifies the float32 rounding differences of the
# two FFT libraries, reaching ~1e-3 after 32 iterations (measured).
@pytest.mark.parametrize(("momentum", "tolerance"), [(0.0, 1e-4), (0.99, 5e-3)])
def test_griffin_lim_matches_librosa_from_zero_phase(momentum: float, tolerance: float) -> None:
    # Same start (zero phase), same projections, same momentum: the waveforms themselves must agree.
    magnitude = _stft_magnitude(_voiced_clip())  # (K, F)
    vocoder = GriffinLimVocoder(**SETTINGS, num_iters=32, momentum=momentum, random_phase=False)
    ours = vocoder.griffin_lim(torch.from_numpy(magnitude)[None])[0].numpy()
    theirs = librosa.griffinlim(
        magnitude, n_iter=32, hop_length=HOP, n_fft=N_FFT, window="hann", center=True, pad_mode="reflect",
        momentum=momentum, init=None,
    )  # fmt: skip
    assert ours.shape == theirs.shape
    assert np.linalg.norm(ours - theirs) < tolerance * np.linalg.norm(theirs)


def test_griffin_lim_converges_like_librosa_from_random_phase() -> None:
    magnitude = _stft_magnitude(_voiced_clip())
    one_step = GriffinLimVocoder(**SETTINGS, num_iters=1).griffin_lim(
        torch.from_numpy(magnitude)[None], generator=torch.Generator().manual_seed(0)
    )[0].numpy()
    ours = GriffinLimVocoder(**SETTINGS, num_iters=32).griffin_lim(
        torch.from_numpy(magnitude)[None], generator=torch.Generator().manual_seed(0)
    )[0].numpy()
    theirs = librosa.griffinlim(
        magnitude, n_iter=32, hop_length=HOP, n_fft=N_FFT, window="hann", pad_mode="reflect", momentum=0.99,
        random_state=0,
    )
    ours_sc, theirs_sc = _spectral_convergence(magnitude, ours), _spectral_convergence(magnitude, theirs)
    assert ours_sc < MAX_SPECTRAL_CONVERGENCE
    assert ours_sc <= theirs_sc + MARGIN
    assert ours_sc < 0.5 * _spectral_convergence(magnitude, one_step)  # the iterations do the work


def test_log_mel_round_trip_against_librosa_mel_to_audio() -> None:
    wave = _voiced_clip()
    log_mel = LogMel(**SETTINGS)(torch.from_numpy(wave)[None])  # (1, F, M)
    ours = GriffinLimVocoder(**SETTINGS)(log_mel, length=wave.size, generator=torch.Generator().manual_seed(0))
    assert ours.shape == (1, wave.size) and ours.dtype == torch.float32
    np.random.seed(0)  # mel_to_audio draws its start phases from numpy's global generator
    theirs = librosa.feature.inverse.mel_to_audio(
        log_mel[0].exp().T.numpy(), sr=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, window="hann", center=True,
        pad_mode="reflect", power=2.0, n_iter=32, length=wave.size,
    )  # fmt: skip
    ours_error, theirs_error = _log_mel_error(log_mel, ours), _log_mel_error(log_mel, theirs)
    assert ours_error < MAX_LOG_MEL_ERROR
    assert ours_error <= theirs_error + MARGIN


def test_each_clip_in_a_batch_is_vocoded_on_its_own() -> None:
    # A clip's waveform must not depend on the other clips of its batch or on its place in it. The
    # batches compared have one size: on some CPUs (a Xeon with AMX) the FFTs round differently
    # for another batch size, and 32 momentum iterations grow that to 0.004 of a 0.43 peak, so one
    # clip alone is compared by what it sounds like (its log-mel), not sample by sample.
    clips = torch.from_numpy(np.stack([_voiced_clip(seed=0), 0.1 * _voiced_clip(seed=1)[::-1].copy()]))
    log_mel = LogMel(**SETTINGS)(clips)  # (2, F, M)
    vocoder = GriffinLimVocoder(**SETTINGS, random_phase=False)
    batched = vocoder(log_mel)
    assert batched.shape == (2, (log_mel.shape[1] - 1) * HOP)
    swapped = vocoder(log_mel.flip(0))
    torch.testing.assert_close(batched, swapped.flip(0), rtol=1e-4, atol=1e-5)
    for i in range(2):
        twice = vocoder(log_mel[[i, i]])
        torch.testing.assert_close(twice, batched[[i, i]], rtol=1e-4, atol=1e-5)
        alone = vocoder(log_mel[i : i + 1])
        assert abs(_log_mel_error(log_mel[i : i + 1], alone) - _log_mel_error(log_mel[i : i + 1], batched[i : i + 1])) < 1e-3


@pytest.mark.parametrize("num_samples", [16037, 4000])
def test_output_length_and_frame_count(num_samples: int) -> None:
    log_mel = LogMel(**SETTINGS)(torch.from_numpy(_voiced_clip(num_samples))[None])
    vocoder = GriffinLimVocoder(**SETTINGS, num_iters=4)
    natural = vocoder(log_mel, generator=torch.Generator().manual_seed(0))
    assert natural.shape == (1, (log_mel.shape[1] - 1) * HOP)
    exact = vocoder(log_mel, length=num_samples, generator=torch.Generator().manual_seed(0))
    assert exact.shape == (1, num_samples)
    assert LogMel(**SETTINGS)(exact).shape == log_mel.shape  # LogMel gives back as many frames
    # The same seed gives the same audio; ``length`` only trims or zero-pads the end.
    common = min(natural.shape[1], num_samples)
    torch.testing.assert_close(exact[:, :common], natural[:, :common])


def test_level_is_kept() -> None:
    # Log-mel carries absolute power; a clip 20 dB quieter must come back 20 dB quieter. Plain
    # Griffin-Lim is exactly scale-equivariant, so the two agree to float32 rounding; with momentum
    # 0.99 the rounding is amplified over the iterations by a factor that depends on the CPU's
    # kernels (0.5% on one machine, 0.7% on another), so its level is checked by the RMS alone.
    wave = _voiced_clip()
    plain = GriffinLimVocoder(**SETTINGS, random_phase=False, momentum=0.0)
    loud = plain(LogMel(**SETTINGS)(torch.from_numpy(wave)[None]))
    quiet = plain(LogMel(**SETTINGS)(torch.from_numpy(0.1 * wave)[None]))
    assert torch.linalg.norm(quiet - 0.1 * loud) < 1e-3 * torch.linalg.norm(0.1 * loud)
    fast = GriffinLimVocoder(**SETTINGS, random_phase=False)
    for scale in (1.0, 0.1):
        out = fast(LogMel(**SETTINGS)(torch.from_numpy(scale * wave)[None]))
        rms_ratio = (out.square().mean().sqrt() / (scale * torch.from_numpy(wave)).square().mean().sqrt()).item()
        assert 0.8 < rms_ratio < 1.25, (scale, rms_ratio)


def _mel_band_spacing_hz(freq_hz: float) -> float:
    """Distance between the centres of the two mel bands around ``freq_hz`` (the mel resolution there)."""
    centres = librosa.mel_frequencies(n_mels=NUM_MELS + 2, fmin=0.0, fmax=SAMPLE_RATE / 2)[1:-1]
    i = int(np.searchsorted(centres, freq_hz))
    return float(centres[i] - centres[i - 1])


@pytest.mark.parametrize("freq_hz", [440.0, 1500.0, 3000.0])
def test_sine_pitch_survives(freq_hz: float) -> None:
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    sine = (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)
    log_mel = LogMel(**SETTINGS)(torch.from_numpy(sine)[None])
    out = GriffinLimVocoder(**SETTINGS)(log_mel, generator=torch.Generator().manual_seed(0))[0].numpy()
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / out.size
    # The mel frame only knows the pitch to within its band spacing; ask for half of that.
    assert abs(peak_hz - freq_hz) < 0.5 * _mel_band_spacing_hz(freq_hz)


def test_low_precision_input_gives_fp32_audio() -> None:
    log_mel = LogMel(**SETTINGS)(torch.from_numpy(_voiced_clip(4000))[None])
    out = GriffinLimVocoder(**SETTINGS, num_iters=4)(log_mel.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_wrong_number_of_mels_is_refused() -> None:
    with pytest.raises(ValueError, match="64"):
        GriffinLimVocoder(**SETTINGS)(torch.zeros(1, 10, 80))


def test_write_wav_round_trip(tmp_path) -> None:
    wave = torch.from_numpy(_voiced_clip(8000)) * 3.0  # peak 0.9 -> rescaled to WAV_PEAK
    path = write_wav(tmp_path / "out" / "clip.wav", wave, SAMPLE_RATE)
    read, rate = soundfile.read(str(path), dtype="float64")
    info = soundfile.info(str(path))
    assert rate == SAMPLE_RATE and info.channels == 1 and info.subtype == "PCM_16"
    assert read.shape == (8000,)
    np.testing.assert_allclose(np.abs(read).max(), WAV_PEAK, atol=1.0 / 32768)
    expected = wave.double().numpy() * (WAV_PEAK / wave.abs().max().item())
    np.testing.assert_allclose(read, expected, atol=1.0 / 32768)  # within 16-bit quantisation


def test_write_wav_silence_and_bad_shapes(tmp_path) -> None:
    path = write_wav(tmp_path / "silent.wav", np.zeros(100), SAMPLE_RATE)
    assert (soundfile.read(str(path))[0] == 0).all()
    with pytest.raises(ValueError, match="shape"):
        write_wav(tmp_path / "batch.wav", torch.zeros(2, 100), SAMPLE_RATE)
    with pytest.raises(ValueError, match="NaN"):
        write_wav(tmp_path / "nan.wav", np.array([0.0, np.nan]), SAMPLE_RATE)
