"""Flite voices: each voice speaks at its rate, a request gives the same samples whatever was spoken
before (in this process or a fresh one), the seed moves only the voices that draw noise, stretch
and pitch do what they say, flite requests in a batch leave its espeak ones as they were, and
a machine without flite gets an error that says how to install it. Skipped where flite is missing
(it comes from the system: ``apt-get install flite``), except that error's test."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from polymodal.datasets.spoken_numbers import flite
from polymodal.datasets.spoken_numbers.espeak import VoiceConfig
from polymodal.datasets.spoken_numbers.flite import FliteVoice, random_flite_voice, synthesize_native
from polymodal.errors import DataError

needs_flite = pytest.mark.skipif(not flite.available(), reason="flite is not installed (apt-get install flite)")


def _pitch(wave: np.ndarray, rate: int) -> float:
    """Median autocorrelation pitch (Hz) of the middle half, 60-400 Hz."""
    x = wave.astype(np.float64)[wave.size // 4 : 3 * wave.size // 4]
    frame, low, high = 1024, rate // 400, rate // 60
    found = []
    for start in range(0, x.size - frame, frame // 2):
        segment = x[start : start + frame] - x[start : start + frame].mean()
        ac = np.correlate(segment, segment, "full")[frame - 1 :]
        found.append(rate / (low + int(np.argmax(ac[low:high]))))
    return float(np.median(found))


@needs_flite
@pytest.mark.parametrize("name", flite.VOICES)
def test_every_voice_speaks_at_its_rate(name):
    wave, rate = synthesize_native("seven", FliteVoice(name), seed=0)
    assert rate == (8000 if name == "kal" else 16000)
    assert wave.dtype == np.int16 and 0.2 * rate < wave.size < 2 * rate
    assert np.abs(wave.astype(np.float32)).max() > 1000


@needs_flite
def test_a_request_does_not_depend_on_what_came_before():
    voice = FliteVoice("slt", stretch=1.2, pitch=190.0)
    first, _ = synthesize_native("three", voice, seed=11)
    synthesize_native("nine hundred", FliteVoice("awb", stretch=0.9, pitch=100.0), seed=5)
    synthesize_native("three", voice, seed=12)
    again, _ = synthesize_native("three", voice, seed=11)
    assert np.array_equal(first, again)
    code = (
        "from polymodal.datasets.spoken_numbers.flite import FliteVoice, synthesize_native\n"
        "import hashlib\n"
        "w, _ = synthesize_native('three', FliteVoice('slt', stretch=1.2, pitch=190.0), seed=11)\n"
        "print(hashlib.sha256(w.tobytes()).hexdigest())\n"
    )
    fresh = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert fresh == hashlib.sha256(first.tobytes()).hexdigest()


@needs_flite
def test_seed_moves_the_clustergen_voices_only():
    for name, moves in (("slt", True), ("awb", True), ("kal16", False)):
        a, _ = synthesize_native("four", FliteVoice(name), seed=1)
        b, _ = synthesize_native("four", FliteVoice(name), seed=2)
        assert (a.shape != b.shape or not np.array_equal(a, b)) == moves, name


@needs_flite
def test_stretch_slows_and_pitch_raises():
    short, rate = synthesize_native("zero one two three", FliteVoice("kal16", stretch=0.8), seed=0)
    long, _ = synthesize_native("zero one two three", FliteVoice("kal16", stretch=1.5), seed=0)
    assert 1.5 < long.size / short.size < 2.2
    low, rate = synthesize_native("zero one two three", FliteVoice("slt", pitch=150.0), seed=0)
    high, _ = synthesize_native("zero one two three", FliteVoice("slt", pitch=230.0), seed=0)
    assert 1.3 < _pitch(high, rate) / _pitch(low, rate) < 1.8  # 230 / 150 = 1.53


def test_drawn_voices_stay_in_their_ranges():
    rng = np.random.default_rng(0)
    voices = [random_flite_voice(rng) for _ in range(200)]
    assert {v.name for v in voices} == set(flite.VOICES)
    assert all(flite.STRETCH[0][0] <= v.stretch <= flite.STRETCH[0][1] for v in voices)
    longest = [random_flite_voice(rng, digits=5) for _ in range(50)]
    assert all(flite.STRETCH[-1][0] <= v.stretch <= flite.STRETCH[-1][1] for v in longest)
    assert all(flite.VOICE_PITCH[v.name][0] <= v.pitch <= flite.VOICE_PITCH[v.name][1] for v in voices)
    again = np.random.default_rng(0)
    assert voices == [random_flite_voice(again) for _ in range(200)]


@needs_flite
def test_unknown_voice_is_named():
    with pytest.raises(ValueError, match="voices: kal"):
        synthesize_native("one", FliteVoice("nobody"), seed=0)


@needs_flite
def test_flite_requests_leave_the_espeak_ones_as_they_were(monkeypatch):
    from polymodal.datasets.spoken_numbers import speech

    monkeypatch.setattr(speech, "SYNTH_CHUNK", 3)
    texts = ["one", "two", "three", "four", "five"]
    voices = [VoiceConfig("en-us+m3"), VoiceConfig("en+klatt4", 120), VoiceConfig("en-029+f2"), VoiceConfig("en"), VoiceConfig("en-gb-x-rp+m1")]
    others = [FliteVoice("slt", 1.1, 200.0), None, FliteVoice("awb"), FliteVoice("kal", 1.3), None]
    seeds = [4, 5, 6, 7, 8]
    audio, offsets = speech.synthesize_many(texts, voices, seeds, sample_rate=16000, num_workers=1, flite_voices=others)
    pooled, pooled_offsets = speech.synthesize_many(texts, voices, seeds, sample_rate=16000, num_workers=2, flite_voices=others)
    plain, plain_offsets = speech.synthesize_many(texts, voices, seeds, sample_rate=16000, num_workers=1)
    assert np.array_equal(audio, pooled) and np.array_equal(offsets, pooled_offsets)
    for i, other in enumerate(others):
        mixed, alone = audio[offsets[i] : offsets[i + 1]], plain[plain_offsets[i] : plain_offsets[i + 1]]
        if other is None:
            assert np.array_equal(mixed, alone)  # the espeak engine's history is untouched
        else:
            flite_alone = speech.to_int16(speech._postprocess(*synthesize_native(texts[i], other, seed=seeds[i]), 16000))
            assert np.array_equal(mixed, flite_alone)


def test_missing_flite_names_the_install(monkeypatch):
    def refuse(name, mode=0):
        raise OSError(f"{name}: cannot open shared object file")

    flite._flite.cache_clear()
    monkeypatch.setattr(flite.ctypes, "CDLL", refuse)
    try:
        with pytest.raises(DataError, match="apt-get install flite"):
            synthesize_native("one", FliteVoice(), seed=0)
        assert not flite.available()
    finally:
        flite._flite.cache_clear()
