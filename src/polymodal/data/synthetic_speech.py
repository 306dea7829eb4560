"""Synthetic speech of a manifest's own transcripts: more voices for a speech model trained on few.

A speech manifest from a handful of talkers teaches a model those talkers: trained on 3 speakers of
the Free Spoken Digit Dataset, the ``speech`` preset read the 4th at 57-77% (BENCHMARKS.md). Adding
the training transcripts spoken by many synthetic voices (TTS augmentation: Li et al. 2018,
Training Neural Speech Recognition Systems with Synthetic Speech Augmentation, arXiv:1811.00707;
Rossenbach et al. 2020, Generating Synthetic Audio Data for Attention-Based Speech Recognition
Systems, arXiv:1912.09257) gives the model speech whose words it knows and whose voices vary
widely, so it has to learn the words rather than the talkers.

The voices are espeak-ng's (8 English accents x about 100 variants, drawn rate and pitch; the
built-in data's ``TRAINING_VOICES``) and, for a share ``flite_share`` of the utterances, flite's
(``spoken_numbers/flite.py``: diphone and clustergen voices of four real talkers, drawn pace and
pitch; needs the system's ``flite``). Each utterance is "recorded" as the built-in training speech is
(talker speed, silence, room, noise, level, microphone: ``spoken_numbers/recording.py``). The speech
is English: for a manifest in another language, leave ``synthetic_speech`` at 0. Utterances then
pass through the manifest's own channel: resampled down to the native rate of most of its
training clips and back, so the synthetic speech has nothing above the band real clips have.

Nothing here knows the manifest's content: transcripts are spoken as written, in turn (utterance i
speaks the i-th distinct transcript modulo their number).

With ``speakers`` (what ``data.speaker_norm`` asks for), the utterances come as synthetic speakers:
each run of ``SPEAKER_UTTERANCES`` consecutive utterances is spoken by one voice (the run's first
utterance's), and names that speaker, so speaker-level normalisation treats them as it treats the
manifest's real speakers (leave-one-speaker-out on FSDD: mean 88.7% against 84.55% with each
utterance normalised alone, BENCHMARKS.md). Pace, room and microphone are still drawn per
utterance. Synthesis runs once per set of parameters and is cached (``polymodal.data.cache``):
about 17 ms per utterance on one core.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch.utils.data import Dataset

from polymodal.data import cache
from polymodal.data.augment_audio import band_limit
from polymodal.data.batch import Sample
from polymodal.datasets.spoken_numbers.espeak import VoiceConfig
from polymodal.datasets.spoken_numbers.flite import FliteVoice, flite_version, random_flite_voice
from polymodal.datasets.spoken_numbers.speech import INT16_SCALE, TRAINING_VOICES, espeak_version, random_voice, synthesize_many, to_int16

logger = logging.getLogger(__name__)

CACHE_NAME = "synthetic_speech"
VOICE_DIGITS = 1  # the rate range of a one-digit number: 100-260 words per minute
SPEAKER_UTTERANCES = 10  # utterances per synthetic speaker (``speakers``): a digit manifest's every word


def channel_rate(paths: Sequence[str | Path], *, sample_rate: int) -> int:
    """The native rate of most of ``paths`` (audio files), at most ``sample_rate``: the band the
    real clips have. Unreadable files are left out (the loader skips and counts them later)."""
    rates = collections.Counter()
    for path in paths:
        try:
            rates[int(soundfile.info(str(path)).samplerate)] += 1
        except (OSError, RuntimeError):  # soundfile's errors are RuntimeErrors
            continue
    if not rates:
        return sample_rate
    return min(rates.most_common(1)[0][0], sample_rate)


def draw_voices(count: int, *, seed: int, flite_share: float = 0.0) -> tuple[list[VoiceConfig], list[FliteVoice | None], np.ndarray]:
    """The voices of ``count`` utterances: espeak-ng's, flite's where flite speaks instead (None
    elsewhere), and their (2, count) noise and recording seeds.

    The espeak-ng voices and the seeds come from ``seed`` alone; a share ``flite_share`` of the
    utterances (rounded), drawn from a seed of their own, are spoken by flite instead, so 0 gives
    what this gave before flite was added, and the others are spoken as they are without flite.
    """
    if not 0.0 <= flite_share <= 1.0:
        raise ValueError(f"flite_share must lie in [0, 1], got {flite_share}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, count]))
    voices = [random_voice(rng, digits=VOICE_DIGITS, ranges=TRAINING_VOICES) for _ in range(count)]
    seeds = rng.integers(0, 2**31 - 1, size=(2, count))
    flite_voices: list[FliteVoice | None] = [None] * count
    if flite_share > 0:
        flite_rng = np.random.default_rng(np.random.SeedSequence([seed, count, 1]))
        for i in sorted(flite_rng.permutation(count)[: int(round(flite_share * count))].tolist()):
            flite_voices[i] = random_flite_voice(flite_rng)
    return voices, flite_voices, seeds


def synthetic_speaker(index: int) -> str:
    """The speaker of synthetic utterance ``index`` with ``speakers`` (never a manifest's own name)."""
    return f"<synthetic voice {index // SPEAKER_UTTERANCES}>"


def synthesize_transcripts(
    texts: Sequence[str], count: int, *, sample_rate: int, channel: int, seed: int, flite_share: float = 0.0, speakers: bool = False
) -> tuple[list[np.ndarray], list[int]]:
    """``count`` utterances of ``texts`` (spoken in turn), each by a drawn voice, recorded.

    Args:
        texts: the distinct transcripts, in a fixed order.
        count: how many utterances.
        sample_rate: the rate of the output, in Hz.
        channel: the rate the speech passes through (down and back up) when below ``sample_rate``.
        seed: draws voices and recordings.
        flite_share: the share of utterances spoken by flite voices instead of espeak-ng ones,
            drawn from their own seed (0 leaves every utterance as it was without flite).
        speakers: each run of ``SPEAKER_UTTERANCES`` utterances spoken by one voice.

    Returns:
        waves: ``count`` (T_i,) float32 arrays in [-1, 1] at ``sample_rate``, on the 16-bit grid
            (as a WAV file would hold them, and the cache does).
        which: (count,) the index in ``texts`` each utterance speaks.
    """
    if not texts:
        raise ValueError("synthetic speech needs at least one transcript")
    which = [i % len(texts) for i in range(count)]
    voices, flite_voices, seeds = draw_voices(count, seed=seed, flite_share=flite_share)
    if speakers:  # the voice of each run's first utterance speaks the run
        first = [i - i % SPEAKER_UTTERANCES for i in range(count)]
        voices, flite_voices = [voices[j] for j in first], [flite_voices[j] for j in first]
    audio, offsets = synthesize_many(
        [texts[i] for i in which], voices, seeds[0].tolist(), sample_rate=sample_rate, recordings=seeds[1].tolist(), flite_voices=flite_voices
    )
    waves = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        wave = audio[start:stop].astype(np.float32) / INT16_SCALE
        if channel < sample_rate:  # the manifest's band: nothing above channel / 2
            wave = band_limit(wave, sample_rate, channel)
            wave = wave / max(1.0, float(np.abs(wave).max()))  # scale, never clip
        waves.append(to_int16(wave).astype(np.float32) / np.float32(INT16_SCALE))
    return waves, which


class SyntheticSpeech(Dataset):
    """Synthetic utterances as manifest-like samples: ``Sample(audio, text, label)``.

    Args:
        waves: N (T_i,) float32 waveforms at the data's rate.
        texts: N transcripts.
        labels: N labels (-1 when unknown), taken from a training line with the same transcript.
        speakers: the utterances were spoken as synthetic speakers (``synthetic_speaker`` names them).
    """

    def __init__(self, waves: Sequence[np.ndarray], texts: Sequence[str], labels: Sequence[int], *, speakers: bool = False) -> None:
        if not len(waves) == len(texts) == len(labels):
            raise ValueError(f"waves, texts and labels differ in length: {len(waves)}, {len(texts)}, {len(labels)}")
        self.waves, self.texts, self.labels = list(waves), list(texts), [int(x) for x in labels]
        self.speakers = speakers

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, index: int) -> Sample:
        speaker = synthetic_speaker(index) if self.speakers else None
        return Sample(audio=torch.from_numpy(self.waves[index]), text=self.texts[index], label=self.labels[index], speaker=speaker)


def synthetic_speech_for(
    entries: Sequence[dict],
    media: Sequence[Path],
    count: int,
    *,
    sample_rate: int,
    seed: int,
    flite_share: float = 0.0,
    speakers: bool = False,
    cache_dir: str | Path | None = None,
) -> SyntheticSpeech:
    """``count`` synthetic utterances of the transcripts of ``entries`` (manifest lines with audio and
    text), at ``sample_rate`` through the channel of ``media`` (their audio files), a share
    ``flite_share`` of them by flite voices, as synthetic speakers with ``speakers``, cached.

    Raises:
        ValueError: no entry has both audio and text.
    """
    labels: dict[str, int] = {}
    for entry in entries:
        if isinstance(entry.get("text"), str) and entry.get("audio") is not None:
            labels.setdefault(entry["text"], int(entry.get("label", -1)))
    if not labels:
        raise ValueError("synthetic speech: no training line has both audio and text to speak")
    texts = sorted(labels)
    channel = channel_rate(media, sample_rate=sample_rate)
    params = {"texts": texts, "count": count, "sample_rate": sample_rate, "channel": channel, "seed": seed, "espeak": espeak_version()}
    if flite_share > 0:  # absent at 0, so caches made before flite stay valid
        params.update(flite_share=flite_share, flite=flite_version())
    if speakers:  # absent without, so caches made before stay valid
        params.update(speaker_utterances=SPEAKER_UTTERANCES)
    path = cache.cache_path(CACHE_NAME, params, cache_dir=cache_dir)
    found = cache.load_entry(path)
    if found is None:
        waves, which = synthesize_transcripts(
            texts, count, sample_rate=sample_rate, channel=channel, seed=seed, flite_share=flite_share, speakers=speakers
        )
        lengths = np.array([w.shape[0] for w in waves], dtype=np.int64)
        cache.save_entry(path, {"audio": to_int16(np.concatenate(waves)), "lengths": lengths, "which": np.array(which)}, {})
    else:
        arrays = found[0]
        audio = arrays["audio"].astype(np.float32) / np.float32(INT16_SCALE)
        waves = np.split(audio, np.cumsum(arrays["lengths"])[:-1])
        which = arrays["which"].tolist()
    logger.info("synthetic speech: %d utterances (%.0f%% flite) of %d transcripts through a %d Hz channel", count, 100 * flite_share, len(texts), channel)
    return SyntheticSpeech(waves, [texts[i] for i in which], [labels[texts[i]] for i in which], speakers=speakers)
