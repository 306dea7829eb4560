"""Audio augmentation: each transform against a hand reference or audiomentations, and its
property (speed 1 is identity and 1.1 raises a tone's pitch by 10 %, the asked SNR is measured on
the output, pink noise falls 1 decade of power per decade of frequency, band-limiting empties
the band above 4 kHz, the reverb keeps the direct path and its tail decays at the asked RT60, gain
scales the RMS); SpecAugment stays inside the real frames; the chain's determinism and range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch
from scipy.signal import welch

from polymodal.data.augment import sample_rng
from polymodal.data.augment_audio import (
    AudioAugmentSettings,
    add_noise,
    augment_waveform,
    band_limit,
    change_speed,
    noise_clip,
    pink_noise,
    reverberate,
    spec_augment,
    synthetic_impulse_response,
    white_noise,
)
from polymodal.errors import ConfigError

RATE = 16000
ALL_ON = AudioAugmentSettings(speed_p=1.0, reverb_p=1.0, noise_p=1.0, band_limit_p=1.0, gain_p=1.0)


def _tone(freq: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * RATE)) / RATE
    return amplitude * np.sin(2 * np.pi * freq * t)


def _snr_db(clean: np.ndarray, noisy: np.ndarray) -> float:
    return 10 * math.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))


def _log_log_slope(noise: np.ndarray) -> float:
    """Slope of log10 PSD against log10 frequency (Welch), fitted over 50 Hz - 7 kHz."""
    freqs, psd = welch(noise, fs=RATE, nperseg=4096)
    band = (freqs > 50) & (freqs < 7000)
    return float(np.polyfit(np.log10(freqs[band]), np.log10(psd[band]), 1)[0])


def test_speed_one_is_identity_and_speed_up_raises_the_pitch():
    tone = _tone(440.0)
    assert np.array_equal(change_speed(tone, 1.0), tone)
    fast = change_speed(tone, 1.1)
    assert fast.shape[0] == math.ceil(tone.shape[0] / 1.1)
    # The tone's frequency scales by the factor: 440 Hz -> 484 Hz (FFT peak, 1 Hz bins over 1 s).
    spectrum = np.abs(np.fft.rfft(fast, n=RATE))
    assert abs(np.argmax(spectrum) - 484) <= 1


@pytest.mark.parametrize("kind", ["white", "pink", "clip"])
def test_noise_reaches_the_asked_snr(kind):
    rng = np.random.default_rng(0)
    clean = _tone(300.0) + 0.05 * rng.standard_normal(RATE)
    if kind == "white":
        noise = white_noise(RATE, rng)
    elif kind == "pink":
        noise = pink_noise(RATE, rng)
    else:
        noise = noise_clip(0.2 * _tone(1234.0, seconds=0.3), RATE, rng)  # a short clip, looped
    for snr in (0.0, 7.5, 20.0):
        assert abs(_snr_db(clean, add_noise(clean, noise, snr)) - snr) < 0.5


def test_add_noise_agrees_with_audiomentations_gaussian_snr():
    audiomentations = pytest.importorskip("audiomentations")
    clean = _tone(300.0).astype(np.float32)
    theirs = audiomentations.AddGaussianSNR(min_snr_db=12.0, max_snr_db=12.0, p=1.0)(clean, sample_rate=RATE)
    ours = add_noise(clean.astype(np.float64), white_noise(RATE, np.random.default_rng(1)), 12.0)
    # Both aim at 12 dB; theirs sets the noise std, so it lands within sampling error of it.
    assert abs(_snr_db(clean, ours) - _snr_db(clean, theirs)) < 0.2


def test_pink_noise_slope_is_minus_one_white_is_flat_as_audiomentations_colours_them():
    rng = np.random.default_rng(2)
    pink_slope = _log_log_slope(pink_noise(8 * RATE, rng))
    white_slope = _log_log_slope(white_noise(8 * RATE, rng))
    assert abs(pink_slope + 1.0) < 0.1 and abs(white_slope) < 0.1
    audiomentations = pytest.importorskip("audiomentations")
    pink_db_per_octave = -10 * math.log10(2)  # 1/f is -3.01 dB per octave
    colour = audiomentations.AddColorNoise(
        min_snr_db=0.0, max_snr_db=0.0, min_f_decay=pink_db_per_octave, max_f_decay=pink_db_per_octave,
        p=1.0, n_fft=4096,
    )
    np.random.seed(0)  # audiomentations draws from numpy's global generator
    silence_plus_pink = colour(np.full(8 * RATE, 1e-3, dtype=np.float32), sample_rate=RATE) - 1e-3
    assert abs(_log_log_slope(silence_plus_pink) - pink_slope) < 0.15


def test_band_limiting_removes_the_band_above_4khz_and_keeps_the_band_below():
    noise = white_noise(4 * RATE, np.random.default_rng(3))
    limited = band_limit(noise, RATE, 8000)
    assert limited.shape == noise.shape
    freqs, before = welch(noise, fs=RATE, nperseg=1024)
    _, after = welch(limited, fs=RATE, nperseg=1024)
    above, below = freqs > 4200, freqs < 3500
    assert after[above].sum() < 1e-3 * before[above].sum()
    assert abs(after[below].sum() / before[below].sum() - 1.0) < 0.05
    assert np.array_equal(band_limit(noise, 8000, 8000), noise)  # already narrow: nothing to do


def test_reverb_keeps_the_direct_path_and_adds_a_tail_decaying_at_rt60():
    rt60, drr_db = 0.5, 6.0
    ir = synthetic_impulse_response(RATE, rt60, drr_db, np.random.default_rng(4))
    assert ir[0] == 1.0 and ir.shape == (round(rt60 * RATE),)
    assert math.isclose(10 * math.log10(1.0 / np.sum(ir[1:] ** 2)), drr_db, abs_tol=1e-9)
    # Schroeder backward integration of the tail: the decay from -5 to -25 dB, extrapolated to
    # 60 dB, gives the reverberation time (T20 estimate, ISO 3382).
    energy = np.cumsum(ir[1:][::-1] ** 2)[::-1]
    decay_db = 10 * np.log10(energy / energy[0])
    t = np.arange(1, ir.shape[0]) / RATE
    fit = (decay_db <= -5) & (decay_db >= -25)
    slope = np.polyfit(t[fit], decay_db[fit], 1)[0]  # dB per second
    assert abs(-60.0 / slope - rt60) < 0.1 * rt60

    # On a click: the click itself comes out untouched, followed by the tail.
    click = np.zeros(RATE)
    click[100] = 0.5
    wet = reverberate(click, ir)
    assert wet.shape == click.shape
    assert abs(wet[100] - 0.5) < 1e-12 and np.abs(wet[:100]).max() < 1e-12  # FFT rounding only
    windows = [np.sum(wet[101 + k * 800 : 101 + (k + 1) * 800] ** 2) for k in range(8)]  # 50 ms windows
    assert all(a > b for a, b in zip(windows, windows[1:]))


def test_reverberate_equals_audiomentations_apply_impulse_response(tmp_path):
    audiomentations = pytest.importorskip("audiomentations")
    ir = synthetic_impulse_response(RATE, 0.3, 3.0, np.random.default_rng(5))
    soundfile.write(tmp_path / "ir.wav", ir.astype(np.float32), RATE, subtype="FLOAT")
    clean = (_tone(220.0) + _tone(1000.0, amplitude=0.1)).astype(np.float32)
    theirs = audiomentations.ApplyImpulseResponse(ir_path=str(tmp_path / "ir.wav"), p=1.0)(clean, sample_rate=RATE)
    ours = reverberate(clean.astype(np.float64), ir.astype(np.float32).astype(np.float64))
    # audiomentations rescales its output to a peak of 0.5; the waveform is otherwise the same.
    scale = float(np.dot(theirs, ours) / np.dot(ours, ours))
    np.testing.assert_allclose(theirs, scale * ours, atol=1e-5)


def test_gain_scales_the_rms_as_audiomentations_gain():
    audiomentations = pytest.importorskip("audiomentations")
    clean = torch.from_numpy(_tone(500.0, amplitude=0.1).astype(np.float32))
    settings = AudioAugmentSettings(gain_p=1.0, gain_db=(4.0, 4.0))
    ours = augment_waveform(clean, settings, np.random.default_rng(0), sample_rate=RATE)
    rms = lambda x: float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))  # noqa: E731
    assert math.isclose(rms(ours) / rms(clean), 10 ** (4.0 / 20), rel_tol=1e-6)
    theirs = audiomentations.Gain(min_gain_db=4.0, max_gain_db=4.0, p=1.0)(clean.numpy(), sample_rate=RATE)
    np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-7)


def test_a_clip_driven_past_full_scale_is_scaled_to_peak_one_not_clipped():
    loud = torch.from_numpy(_tone(500.0, amplitude=0.9).astype(np.float32))
    settings = AudioAugmentSettings(gain_p=1.0, gain_db=(6.0, 6.0))
    out = augment_waveform(loud, settings, np.random.default_rng(0), sample_rate=RATE)
    assert math.isclose(float(out.abs().max()), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(out.numpy(), loud.numpy() / 0.9, rtol=1e-5, atol=1e-6)  # same shape, not flattened


def test_the_chain_is_deterministic_per_key_keeps_range_and_dtype():
    clean = torch.from_numpy(_tone(300.0, seconds=0.5).astype(np.float32))
    runs = [
        augment_waveform(clean, ALL_ON, sample_rng(7, 2, index, stream="audio"), sample_rate=RATE)
        for index in (11, 11, 12)
    ]
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape != runs[2].shape or not torch.equal(runs[0], runs[2])
    for out in runs:
        assert out.dtype == torch.float32 and out.ndim == 1 and torch.isfinite(out).all()
        assert float(out.abs().max()) <= 1.0
        assert abs(out.shape[0] - clean.shape[0]) <= round(0.1 * clean.shape[0]) + 1  # speed within 0.9-1.1
    off = augment_waveform(clean, AudioAugmentSettings(), sample_rng(7, 2, 11, stream="audio"), sample_rate=RATE)
    assert torch.equal(off, clean)


def test_turning_a_transform_on_leaves_the_others_draws_alone():
    clean = torch.from_numpy(_tone(300.0, seconds=0.5, amplitude=0.05).astype(np.float32))
    gain_only = AudioAugmentSettings(gain_p=1.0)
    # band-limiting at the clip's own rate changes nothing, but it does draw whether it fires.
    with_band = AudioAugmentSettings(gain_p=1.0, band_limit_p=1.0, band_limit_rate=RATE)
    a = augment_waveform(clean, gain_only, sample_rng(0, 0, 3, stream="audio"), sample_rate=RATE)
    b = augment_waveform(clean, with_band, sample_rng(0, 0, 3, stream="audio"), sample_rate=RATE)
    assert torch.equal(a, b) and not torch.equal(a, clean)


def test_clip_noise_loops_a_short_clip_and_needs_clips():
    clip = np.arange(5, dtype=np.float64)
    out = noise_clip(clip, 12, np.random.default_rng(0))
    start = int(out[0])
    assert np.array_equal(out, (start + np.arange(12)) % 5)
    settings = AudioAugmentSettings(noise_p=1.0, noise_weights=(0.0, 0.0, 1.0))
    with pytest.raises(ConfigError, match="no noise clips"):
        augment_waveform(torch.zeros(100) + 0.1, settings, np.random.default_rng(0), sample_rate=RATE)
    clips = [torch.from_numpy(0.1 * _tone(2000.0, seconds=0.1).astype(np.float32))]
    rng = np.random.default_rng(0)
    out = augment_waveform(torch.zeros(RATE) + 0.1, settings, rng, sample_rate=RATE, noise_clips=clips)
    assert not torch.equal(out, torch.zeros(RATE) + 0.1)


def test_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match=r"data\.augment\.audio\.speed_p"):
        AudioAugmentSettings(speed_p=1.5)
    with pytest.raises(ConfigError, match=r"noise_snr_db.*low above high"):
        AudioAugmentSettings(noise_snr_db=(20.0, 5.0))
    assert not AudioAugmentSettings().active and AudioAugmentSettings(gain_p=0.1).active


def _spec_batch():
    torch.manual_seed(0)
    features = torch.randn(3, 120, 20)
    mask = torch.zeros(3, 120, dtype=torch.bool)
    for b, n in enumerate((120, 80, 35)):
        mask[b, :n] = True
    features[~mask] = 1e4  # a sentinel on the padding
    return features, mask


def test_spec_augment_masks_only_inside_the_real_frames():
    features, mask = _spec_batch()
    settings = AudioAugmentSettings(spec_augment_p=1.0, freq_mask_width=6, time_mask_width=30, time_mask_fraction=0.2)
    rngs = [sample_rng(0, 0, i, stream="spec_augment") for i in range(3)]
    out = spec_augment(features, mask, settings, rngs)
    assert torch.equal(out[~mask], features[~mask])  # padding neither read nor written
    assert torch.equal(features, _spec_batch()[0])  # input untouched
    for b in range(3):
        real = mask[b]
        changed = out[b, real] != features[b, real]  # (n, M)
        fill = features[b, real].mean()
        assert torch.all(out[b, real][changed] == fill)
        bands = changed.all(0)  # mel bins masked over every real frame
        frames = changed.all(1)  # frames masked over every bin
        assert torch.equal(changed, bands[None, :] | frames[:, None])  # nothing but whole bands and frames
        assert bands.sum() <= 2 * 6 and frames.sum() <= 2 * int(0.2 * real.sum())
    assert not torch.equal(out, features)


def test_spec_augment_of_an_item_does_not_depend_on_its_batch():
    features, mask = _spec_batch()
    settings = AudioAugmentSettings(spec_augment_p=1.0)
    batch = spec_augment(features, mask, settings, [sample_rng(1, 0, i, stream="spec_augment") for i in range(3)])
    alone = spec_augment(features[2:], mask[2:], settings, [sample_rng(1, 0, 2, stream="spec_augment")])
    assert torch.equal(batch[2:], alone)
    with pytest.raises(ValueError, match="one generator per item"):
        spec_augment(features, mask, settings, [np.random.default_rng(0)])
