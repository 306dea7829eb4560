"""Synthetic speech of a manifest's transcripts: the same utterances cached and uncached and for the
same seed, transcripts spoken in turn, nothing above the manifest's band, the channel read from the
clips, the manifest's training split grown by exactly the utterances asked for, and a flite share
that swaps exactly that many voices and is cached apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from polymodal.config import load_config
from polymodal.data.synthetic_speech import SPEAKER_UTTERANCES, channel_rate, draw_voices, synthesize_transcripts, synthetic_speech_for
from polymodal.datasets.base import build_source
from polymodal.datasets.spoken_numbers import flite
from polymodal.datasets.spoken_numbers.espeak import VoiceConfig
from polymodal.datasets.spoken_numbers.flite import FliteVoice

RATE = 16000
TEXTS = ("one", "seven", "three")
HIGH_BAND_HZ = 4500.0  # above an 8 kHz channel's Nyquist frequency and its resampling filter's roll-off


def _high_share(wave: np.ndarray) -> float:
    """Share of a waveform's energy above HIGH_BAND_HZ."""
    power = np.abs(np.fft.rfft(wave)) ** 2
    freqs = np.fft.rfftfreq(wave.size, d=1.0 / RATE)
    return float(power[freqs > HIGH_BAND_HZ].sum() / power.sum())


def _clip(path: Path, rate: int) -> str:
    t = np.arange(int(0.3 * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, subtype="FLOAT")
    return path.name


def test_same_seed_same_speech_and_transcripts_in_turn():
    waves, which = synthesize_transcripts(TEXTS, 7, sample_rate=RATE, channel=RATE, seed=3)
    again, _ = synthesize_transcripts(TEXTS, 7, sample_rate=RATE, channel=RATE, seed=3)
    other, _ = synthesize_transcripts(TEXTS, 7, sample_rate=RATE, channel=RATE, seed=4)
    assert which == [0, 1, 2, 0, 1, 2, 0]
    assert all(np.array_equal(a, b) for a, b in zip(waves, again))
    assert not any(a.shape == b.shape and np.allclose(a, b) for a, b in zip(waves, other))
    assert all(w.dtype == np.float32 and np.abs(w).max() <= 1.0 and w.size > 0.1 * RATE for w in waves)


def test_speech_keeps_to_the_channel_band():
    wide, _ = synthesize_transcripts(TEXTS, 6, sample_rate=RATE, channel=RATE, seed=0)
    narrow, _ = synthesize_transcripts(TEXTS, 6, sample_rate=RATE, channel=8000, seed=0)
    # The same utterances: the wide ones carry fricatives above 4 kHz, the narrow ones nothing there.
    assert max(_high_share(w) for w in wide) > 1e-2
    assert max(_high_share(w) for w in narrow) < 1e-4


def test_channel_is_the_rate_of_most_clips(tmp_path):
    paths = [tmp_path / _clip(tmp_path / f"a{i}.wav", 8000) for i in range(3)] + [tmp_path / _clip(tmp_path / "b.wav", 22050)]
    (tmp_path / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    assert channel_rate([*paths, tmp_path / "broken.wav"], sample_rate=RATE) == 8000
    assert channel_rate(paths[3:], sample_rate=RATE) == RATE  # never above the data's rate
    assert channel_rate([tmp_path / "broken.wav"], sample_rate=RATE) == RATE


def test_cached_equals_uncached(tmp_path):
    entries = [{"audio": "x.wav", "text": t, "label": i} for i, t in enumerate(TEXTS)] + [{"text": "no audio"}]
    media = [tmp_path / _clip(tmp_path / "x.wav", 8000)]
    first = synthetic_speech_for(entries, media, 5, sample_rate=RATE, seed=1, cache_dir=tmp_path / "cache")
    second = synthetic_speech_for(entries, media, 5, sample_rate=RATE, seed=1, cache_dir=tmp_path / "cache")
    direct, which = synthesize_transcripts(sorted(TEXTS), 5, sample_rate=RATE, channel=8000, seed=1)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    for i in range(5):
        assert np.array_equal(first[i].audio.numpy(), direct[i]) and np.array_equal(second[i].audio.numpy(), direct[i])
        assert first[i].text == second[i].text == sorted(TEXTS)[which[i]]
        assert first[i].label == TEXTS.index(first[i].text)  # a line's label travels with its transcript
    with pytest.raises(ValueError, match="both audio and text"):
        synthetic_speech_for(entries[-1:], media, 5, sample_rate=RATE, seed=1, cache_dir=tmp_path / "cache")


def test_manifest_training_split_grows_by_the_utterances(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    lines = [{"audio": _clip(tmp_path / f"c{i}.wav", 8000), "text": TEXTS[i % 3], "label": i % 3} for i in range(20)]
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    overrides = [f"data.manifest={manifest}", "data.source=manifest", "model.tasks=[audio_to_text]"]
    plain = build_source(load_config(["tiny"], overrides).data, 0).load()
    source = build_source(load_config(["tiny"], [*overrides, "data.options.synthetic_speech=9"]).data, 0)
    splits = source.load()
    assert len(splits.train) == len(plain.train) + 9 and len(splits.val) == len(plain.val)
    added = [splits.train[len(plain.train) + i] for i in range(9)]
    assert sorted(s.text for s in added) == sorted(TEXTS * 3) and all(s.label == TEXTS.index(s.text) for s in added)
    assert f"train: {len(plain.train) + 9} lines (audio: {len(plain.train) + 9}, text: {len(plain.train) + 9})" in source.describe(splits)


def test_a_negative_count_names_the_setting(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"audio": _clip(tmp_path / "c.wav", 8000), "text": "one"}) + "\n")
    with pytest.raises(Exception, match="synthetic_speech"):
        load_config(["tiny"], [f"data.manifest={manifest}", "data.source=manifest", "data.options.synthetic_speech=-1"])


def test_a_flite_share_swaps_exactly_that_many_voices():
    voices, none, seeds = draw_voices(40, seed=2)
    same_voices, others, same_seeds = draw_voices(40, seed=2, flite_share=0.25)
    assert none == [None] * 40 and all(isinstance(v, VoiceConfig) for v in voices)
    assert same_voices == voices and np.array_equal(seeds, same_seeds)
    assert sum(isinstance(v, FliteVoice) for v in others) == 10 and others.count(None) == 30
    with pytest.raises(ValueError, match="flite_share"):
        draw_voices(4, seed=0, flite_share=1.5)


@pytest.mark.skipif(not flite.available(), reason="flite is not installed (apt-get install flite)")
def test_flite_speech_is_cached_apart_and_keeps_to_the_band(tmp_path):
    entries = [{"audio": "x.wav", "text": t, "label": i} for i, t in enumerate(TEXTS)]
    media = [tmp_path / _clip(tmp_path / "x.wav", 8000)]
    mixed = synthetic_speech_for(entries, media, 6, sample_rate=RATE, seed=1, flite_share=0.5, cache_dir=tmp_path / "cache")
    plain = synthetic_speech_for(entries, media, 6, sample_rate=RATE, seed=1, cache_dir=tmp_path / "cache")
    again = synthetic_speech_for(entries, media, 6, sample_rate=RATE, seed=1, flite_share=0.5, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert [s.text for s in mixed] == [s.text for s in plain]  # transcripts in turn either way
    assert all(np.array_equal(a.audio.numpy(), b.audio.numpy()) for a, b in zip(mixed, again))
    assert sum(not np.array_equal(a.audio.numpy(), b.audio.numpy()) for a, b in zip(mixed, plain)) == 3  # exactly the flite ones
    assert max(_high_share(s.audio.numpy()) for s in mixed) < 1e-4


def test_flite_share_settings_are_checked(tmp_path):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text(json.dumps({"audio": _clip(tmp_path / "c.wav", 8000), "text": "one"}) + "\n")
    overrides = [f"data.manifest={manifest}", "data.source=manifest"]
    with pytest.raises(Exception, match="set synthetic_speech too"):
        load_config(["tiny"], [*overrides, "data.options.synthetic_flite=0.5"])
    with pytest.raises(Exception, match=r"synthetic_flite.*\[0, 1\]"):
        load_config(["tiny"], [*overrides, "data.options.synthetic_speech=10", "data.options.synthetic_flite=2"])


def test_speakers_share_the_voice_of_their_first_utterance(tmp_path, monkeypatch):
    """With speakers, each run of SPEAKER_UTTERANCES utterances is one voice, named as one speaker."""
    import polymodal.data.synthetic_speech as synthetic

    run = SPEAKER_UTTERANCES
    asked = []
    speak = synthetic.synthesize_many
    monkeypatch.setattr(synthetic, "synthesize_many", lambda texts, voices, *a, **k: asked.append(voices) or speak(texts, voices, *a, **k))
    _, which = synthesize_transcripts(TEXTS, run + 2, sample_rate=RATE, channel=RATE, seed=5)
    _, grouped_which = synthesize_transcripts(TEXTS, run + 2, sample_rate=RATE, channel=RATE, seed=5, speakers=True)
    plain, grouped = asked
    assert grouped_which == which  # the same transcripts, in turn
    assert grouped == [plain[0]] * run + [plain[run]] * 2
    assert len(set(map(repr, plain[:run]))) > 1  # without speakers, every utterance its own voice
    entries = [{"audio": "x.wav", "text": t, "label": i} for i, t in enumerate(TEXTS)]
    media = [tmp_path / _clip(tmp_path / "x.wav", 8000)]
    spoken = synthetic_speech_for(entries, media, run + 2, sample_rate=RATE, seed=5, speakers=True, cache_dir=tmp_path / "cache")
    unnamed = synthetic_speech_for(entries, media, run + 2, sample_rate=RATE, seed=5, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2  # cached apart
    names = [spoken[i].speaker for i in range(run + 2)]
    assert len(set(names[:run])) == 1 and names[run] == names[run + 1] != names[0]
    assert all(unnamed[i].speaker is None for i in range(run + 2))
