"""espeak-ng synthesis: output format, determinism, voices, and the batched path against the single one."""

import numpy as np
import pytest

from polymodal.datasets.spoken_numbers import speech
from polymodal.datasets.spoken_numbers.speech import ACCENTS, VoiceConfig, synthesize, synthesize_many


def test_format_and_level():
    wave = synthesize("42", voice=VoiceConfig("en-us+m3"), sample_rate=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert 0.3 * 16000 < wave.size < 2.0 * 16000  # "forty two" takes well under 2 s
    assert np.abs(wave).max() == pytest.approx(speech.PEAK_LEVEL, rel=1e-3)
    assert np.sqrt(np.mean(wave**2)) > 0.02  # speech, not near-silence


def test_sample_rate_scales_length():
    a = synthesize("seven", sample_rate=16000)
    b = synthesize("seven", sample_rate=8000)
    assert abs(a.size / b.size - 2.0) < 0.01


def test_pure_function_whatever_came_before():
    voice = VoiceConfig("en+Demonic", rate=190, pitch=40)  # an echo variant: keeps state in C
    first = synthesize("three hundred", voice=voice, seed=5)
    synthesize("nine", voice=VoiceConfig("en-gb-scotland+whisper"), seed=1)
    again = synthesize("three hundred", voice=voice, seed=5)
    np.testing.assert_array_equal(first, again)


def test_every_accent_exists_and_sounds_different():
    waves = [synthesize("twelve", voice=VoiceConfig(accent)) for accent in ACCENTS]
    for wave in waves:
        assert np.abs(wave).max() > 0.5
    distinct = {w.tobytes() for w in waves}
    assert len(distinct) == len(ACCENTS)


def test_variants_change_the_waveform():
    variants = speech.voice_variants()
    assert len(variants) >= 50
    a = synthesize("twelve", voice=VoiceConfig(f"en+{variants[0]}"))
    b = synthesize("twelve", voice=VoiceConfig(f"en+{variants[-1]}"))
    assert a.tobytes() != b.tobytes()


def test_unknown_voice_is_named():
    with pytest.raises(ValueError, match="no voice 'xx-nowhere'"):
        synthesize("one", voice=VoiceConfig("xx-nowhere"))


def test_batched_matches_single_at_fresh_engines(monkeypatch):
    # Each chunk starts a fresh engine, so the first utterance of every chunk must equal the
    # single-call path (which always uses a fresh engine).
    monkeypatch.setattr(speech, "SYNTH_CHUNK", 3)
    rng = np.random.default_rng(0)
    texts = ["7", "42", "105", "999", "13", "0", "860"]
    voices = [speech.random_voice(rng) for _ in texts]
    seeds = list(range(len(texts)))
    audio, offsets = synthesize_many(texts, voices, seeds, sample_rate=16000, num_workers=1)
    assert offsets.shape == (len(texts) + 1,) and offsets[-1] == audio.size
    for i in (0, 3, 6):
        single = speech.to_int16(synthesize(texts[i], voice=voices[i], seed=seeds[i]))
        np.testing.assert_array_equal(audio[offsets[i] : offsets[i + 1]], single)


def test_batched_same_with_any_worker_count(monkeypatch):
    monkeypatch.setattr(speech, "SYNTH_CHUNK", 4)
    rng = np.random.default_rng(1)
    texts = [str(n) for n in rng.integers(0, 1000, 10)]
    voices = [speech.random_voice(rng) for _ in texts]
    one = synthesize_many(texts, voices, list(range(10)), num_workers=1)
    two = synthesize_many(texts, voices, list(range(10)), num_workers=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


def test_longer_numbers_take_longer():
    rng = np.random.default_rng(2)
    short = [synthesize(str(n), voice=speech.random_voice(rng)).size for n in rng.integers(0, 10, 6)]
    long = [synthesize(str(n), voice=speech.random_voice(rng)).size for n in rng.integers(100, 1000, 6)]
    assert np.mean(long) > 1.5 * np.mean(short)


def test_timed_synthesis_gives_the_same_waveform_and_one_start_per_word():
    texts = ["forty two", "three hundred and seventy seven", "seven"]
    for text in texts:
        ((wave, starts),) = speech.synthesize_words([text])  # one fresh engine, as synthesize has
        np.testing.assert_array_equal(wave, speech.synthesize(text))  # word events change nothing
        assert len(starts) == len(text.split())
        assert starts[0] < 0.05 * 16000  # the first word starts right after the trimmed silence
        assert (np.diff(starts) > 0.05 * 16000).all()  # each word lasts more than 50 ms
        assert starts[-1] < len(wave)
