"""Recording the built-in training speech: a function of the clean utterance and its seed; never
longer than the crop (unless the clean utterance was); never above full scale; the microphone's
gain at a frequency as its formula says; band-limited recordings empty above 4.5 kHz; and the
training voices range wider than the evaluation voices, which stay version 1's."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polymodal.datasets.spoken_numbers import recording, speech
from polymodal.datasets.spoken_numbers.speech import EVALUATION_VOICES, TRAINING_VOICES, synthesize

RATE = 16000


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return synthesize("42", voice=speech.VoiceConfig("en-us+m3"), sample_rate=RATE)


def test_a_recording_is_a_function_of_its_seed(clean):
    a, b, c = recording.record(clean, RATE, 7), recording.record(clean, RATE, 7), recording.record(clean, RATE, 8)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and not np.array_equal(a[: min(a.size, c.size)], c[: min(a.size, c.size)])


def test_length_and_level_stay_in_bounds(clean):
    limit = int(recording.MAX_SECONDS * RATE)
    long = np.concatenate([clean] * 4)  # ~2.5 s: longer than the crop already
    for seed in range(40):
        out = recording.record(clean, RATE, seed)
        assert out.size <= limit and np.abs(out).max() <= 1.0
        assert recording.record(long, RATE, seed).size <= long.size  # never slowed down nor padded


def test_the_microphone_gain_at_a_frequency_is_its_formula():
    t = np.arange(4 * RATE) / RATE
    for freq, tilt, corner in ((2000.0, 3.0, 100.0), (250.0, -2.0, 300.0)):
        tone = np.sin(2 * np.pi * freq * t)
        out = recording.microphone(tone, RATE, tilt_db=tilt, highpass_hz=corner)
        ratio = freq / corner
        expected = 10 ** (tilt * math.log2(freq / recording.TILT_PIVOT_HZ) / 20) * ratio / math.sqrt(1 + ratio**2)
        middle = slice(RATE, 3 * RATE)  # away from the ends, where the zero padding of the FFT is felt
        assert np.sqrt(np.mean(out[middle] ** 2)) / np.sqrt(np.mean(tone[middle] ** 2)) == pytest.approx(expected, rel=2e-3)


def test_band_limited_recordings_are_empty_above_4_5_khz(clean, monkeypatch):
    only_channel = recording.AudioAugmentSettings(band_limit_p=1.0, band_limit_rate=8000)
    monkeypatch.setattr(recording, "ROOM_AND_CHANNEL", only_channel)
    out = recording.record(clean, RATE, 3)
    spectrum = np.abs(np.fft.rfft(out)) ** 2
    freqs = np.fft.rfftfreq(out.size, 1 / RATE)
    assert spectrum[freqs > 4500].sum() < 1e-3 * spectrum[freqs < 3800].sum()  # past the filter's transition band


def test_training_voices_range_wider_than_evaluation_voices():
    rng = np.random.default_rng(0)
    train = [speech.random_voice(rng, digits=1, ranges=TRAINING_VOICES) for _ in range(400)]
    held = [speech.random_voice(rng, digits=1, ranges=EVALUATION_VOICES) for _ in range(400)]
    assert min(v.rate for v in train) < EVALUATION_VOICES.slowest_rate[0] <= min(v.rate for v in held)
    assert min(v.pitch for v in train) < EVALUATION_VOICES.pitch[0] and max(v.pitch for v in held) <= EVALUATION_VOICES.pitch[1]
    three = [speech.random_voice(rng, digits=3, ranges=TRAINING_VOICES) for _ in range(200)]
    assert min(v.rate for v in three) >= TRAINING_VOICES.slowest_rate[2]  # long numbers fit the crop
