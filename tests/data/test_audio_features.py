"""Audio front end against librosa and scipy: filterbank, log-mel, frame counts, loading, resampling."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly

from polymodal.data.audio import LOG_FLOOR, LogMel, load_audio, mel_filterbank
from polymodal.errors import DataError


def _noisy_chirp(num_samples: int, sample_rate: int, seed: int = 0) -> np.ndarray:
    """A non-silent test signal with energy in every band: a chirp plus white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / sample_rate
    chirp = 0.5 * np.sin(2 * np.pi * (100 * t + 1500 * t**2))
    return (chirp + 0.05 * rng.standard_normal(num_samples)).astype(np.float32)


@pytest.mark.parametrize(
    ("num_mels", "n_fft", "sample_rate", "f_min", "f_max"),
    [(64, 400, 16000, 0.0, None), (80, 512, 22050, 20.0, 8000.0), (40, 2048, 44100, 0.0, None)],
)
def test_filterbank_matches_librosa(num_mels, n_fft, sample_rate, f_min, f_max) -> None:
    ours = mel_filterbank(num_mels=num_mels, n_fft=n_fft, sample_rate=sample_rate, f_min=f_min, f_max=f_max)
    theirs = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=num_mels, fmin=f_min, fmax=f_max, dtype=np.float64)
    assert ours.shape == (n_fft // 2 + 1, num_mels)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), theirs.T, rtol=1e-6, atol=1e-7)


def test_filterbank_has_unit_area_triangles() -> None:
    # Slaney normalisation: each triangle integrates to 1 over Hz (sum * bin width ~ 1 for fine bins).
    sample_rate, n_fft = 16000, 16384
    bank = mel_filterbank(num_mels=32, n_fft=n_fft, sample_rate=sample_rate).double()
    area = bank.sum(0) * (sample_rate / n_fft)
    np.testing.assert_allclose(area.numpy(), 1.0, rtol=1e-3)


@pytest.mark.parametrize("num_samples", [16000, 16000 + 37, 1234])
def test_log_mel_matches_librosa(num_samples: int) -> None:
    sample_rate, n_fft, hop, num_mels = 16000, 400, 160, 64
    wave = _noisy_chirp(num_samples, sample_rate)
    ours = LogMel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, num_mels=num_mels)(torch.from_numpy(wave)[None])
    mel = librosa.feature.melspectrogram(
        y=wave.astype(np.float64), sr=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=num_mels,
        power=2.0, window="hann", center=True, pad_mode="reflect",
    )  # (num_mels, F)
    theirs = np.log(np.maximum(mel, LOG_FLOOR)).T  # (F, num_mels)
    assert ours.shape == (1, *theirs.shape)
    np.testing.assert_allclose(ours[0].numpy(), theirs, atol=1e-4, rtol=0)


def test_frame_lengths_match_frames_produced() -> None:
    log_mel = LogMel(sample_rate=16000, n_fft=400, hop_length=160, num_mels=16)
    for n in [201, 320, 479, 480, 481, 1000, 16000]:
        produced = log_mel(torch.randn(1, n)).shape[1]
        assert int(log_mel.frame_lengths(torch.tensor([n]))[0]) == produced == 1 + n // 160


def test_batch_rows_equal_single_rows() -> None:
    # Same-length clips in a batch give exactly the per-clip features (no cross-talk in the batch path).
    log_mel = LogMel(num_mels=32)
    waves = torch.from_numpy(np.stack([_noisy_chirp(4000, 16000, seed=s) for s in range(3)]))
    batched = log_mel(waves)
    for i in range(3):
        torch.testing.assert_close(batched[i], log_mel(waves[i : i + 1])[0], atol=1e-5, rtol=0)


def test_silence_hits_the_floor_and_fp32_under_autocast() -> None:
    log_mel = LogMel(num_mels=16)
    silent = log_mel(torch.zeros(2, 1600))
    torch.testing.assert_close(silent, torch.full_like(silent, float(np.log(LOG_FLOOR))))
    wave = torch.from_numpy(_noisy_chirp(3200, 16000))[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = log_mel(wave.bfloat16())
    assert under_autocast.dtype == torch.float32
    # bf16 input rounds the waveform (~3 significant digits), the features stay close
    torch.testing.assert_close(under_autocast, log_mel(wave.bfloat16().float()), atol=1e-5, rtol=0)


def test_short_clip_is_padded_not_rejected() -> None:
    out = LogMel(n_fft=400, hop_length=160, num_mels=8)(torch.randn(1, 50))
    assert out.shape == (1, 1 + 201 // 160, 8) and torch.isfinite(out).all()


def test_filters_are_not_in_the_state_dict() -> None:
    assert LogMel().state_dict() == {}


# ----------------------------------------------------------------------------- loading


def test_load_audio_same_rate_and_stereo_mix(tmp_path) -> None:
    rng = np.random.default_rng(1)
    stereo = (0.3 * rng.standard_normal((1000, 2))).astype(np.float32)
    path = tmp_path / "s.wav"
    soundfile.write(path, stereo, 16000, subtype="FLOAT")
    out = load_audio(path, sample_rate=16000)
    assert out.shape == (1000,) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), stereo.mean(axis=1), atol=1e-7)


def test_load_audio_resample_matches_scipy_and_keeps_frequency(tmp_path) -> None:
    file_rate, target_rate, freq = 44100, 16000, 440.0
    t = np.arange(file_rate) / file_rate  # one second
    tone = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    path = tmp_path / "tone.flac"
    soundfile.write(path, tone, file_rate, subtype="PCM_24")
    out = load_audio(path, sample_rate=target_rate).numpy()
    stored, _ = soundfile.read(path, dtype="float32")
    # 44100 / 16000 reduces by gcd 100 to 441 / 160
    np.testing.assert_allclose(out, resample_poly(stored, 160, 441), atol=1e-6)
    assert out.shape == (target_rate,)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
    peak_hz = np.argmax(spectrum) * target_rate / len(out)
    assert abs(peak_hz - freq) <= 1.0


@pytest.mark.parametrize("kind", ["missing", "random_bytes", "empty_wav"])
def test_load_audio_bad_files_name_the_path(tmp_path, kind: str) -> None:
    path = tmp_path / f"{kind}.wav"
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif kind == "empty_wav":
        soundfile.write(path, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(DataError) as info:
        load_audio(path, sample_rate=16000)
    assert str(path) in str(info.value)
