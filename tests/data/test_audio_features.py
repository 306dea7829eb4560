"""Audio front end against librosa and scipy: filterbank, log-mel, frame counts, loading, resampling."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import resample_poly

from polymodal.data.audio import LOG_FLOOR, LogMel, load_audio, mel_filterbank, speech_bounds
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


@pytest.mark.parametrize("top_db", [20.0, 50.0])
def test_log_mel_floor_matches_librosa_top_db(top_db: float) -> None:
    # librosa's power_to_db(ref=np.max, top_db) is ours in dB, shifted so the clip's peak is 0 dB.
    sample_rate, n_fft, hop, num_mels = 16000, 400, 160, 32
    wave = _noisy_chirp(8000, sample_rate)
    wave[:3000] *= 1e-4  # a quiet lead-in, far below the floor
    ours = LogMel(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, num_mels=num_mels, top_db=top_db)(torch.from_numpy(wave)[None])[0]
    mel = librosa.feature.melspectrogram(
        y=wave.astype(np.float64), sr=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=num_mels,
        power=2.0, window="hann", center=True, pad_mode="reflect",
    )  # (num_mels, F)
    theirs = librosa.power_to_db(mel, ref=np.max, top_db=top_db).T  # (F, num_mels), peak 0 dB
    ours_db = ours.double().numpy() * 10.0 / np.log(10.0)
    np.testing.assert_allclose(ours_db - ours_db.max(), theirs, atol=1e-3, rtol=0)
    assert (theirs == -top_db).mean() > 0.2  # the floor does bite on the quiet part


def test_log_mel_floor_is_per_clip() -> None:
    log_mel = LogMel(num_mels=16, top_db=30.0)
    loud, quiet = (torch.from_numpy(_noisy_chirp(3200, 16000, seed=s)) for s in (0, 1))
    batched = log_mel(torch.stack([loud, 1e-3 * quiet]))
    torch.testing.assert_close(batched[1], log_mel(1e-3 * quiet[None])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[0], log_mel(loud[None])[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="top_db"):
        LogMel(top_db=0.0)


@pytest.mark.parametrize(("top_db", "frame_length", "hop_length"), [(30.0, 400, 160), (60.0, 2048, 512), (20.0, 256, 64)])
def test_speech_bounds_match_librosa_trim(top_db: float, frame_length: int, hop_length: int) -> None:
    rng = np.random.default_rng(1)
    for lead, word, trail in [(4000, 6000, 3000), (0, 5000, 2500), (1500, 4000, 0), (333, 4321, 777)]:
        wave = np.concatenate([1e-4 * rng.standard_normal(lead), _noisy_chirp(word, 16000), 1e-4 * rng.standard_normal(trail)])
        _, (start, end) = librosa.effects.trim(wave, top_db=top_db, frame_length=frame_length, hop_length=hop_length)
        ours = speech_bounds(torch.from_numpy(wave).float(), top_db=top_db, frame_length=frame_length, hop_length=hop_length)
        assert ours == (int(start), int(end))


def test_speech_bounds_by_hand() -> None:
    # A burst in silence: frames of 4 samples every 2, so bounds land within a frame of the burst.
    wave = torch.zeros(40)
    wave[17:23] = 1.0
    start, end = speech_bounds(wave, top_db=20.0, frame_length=4, hop_length=2)
    assert 14 <= start <= 17 and 23 <= end <= 26
    assert speech_bounds(torch.zeros(0), top_db=20.0, frame_length=4, hop_length=2) == (0, 0)
    assert speech_bounds(torch.zeros(10), top_db=20.0, frame_length=4, hop_length=2) == (0, 10)  # all equally silent: kept


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
