"""Speech of the built-in data: espeak-ng (``espeak.py``) reading each number with a random accent,
voice variant, rate and pitch, trimmed and resampled to the dataset's rate, spread over a pool;
training utterances are then "recorded" (``recording.py``: talker, room, noise, channel, level,
microphone), validation and test ones stay clean.

Output is at espeak's native rate (22,050 Hz), brought to the requested rate by polyphase
resampling (``scipy.signal.resample_poly``) with a filter designed once per rate pair.
``synthesize`` uses a fresh engine per call (a pure function, ~1.5 ms to set up);
``synthesize_many`` uses a fresh engine per fixed chunk of ``SYNTH_CHUNK`` requests, so the output
depends only on the requests, not on the number of workers or the process history.

Voices: 8 accents x the variants of espeak-ng-data (about 100), drawn rate and pitch. Training
voices range wider (``TRAINING_VOICES``: most of the pitch scale, and short numbers said as slowly
as careful real talkers say them) than validation and test ones (``EVALUATION_VOICES``, version
1's ranges, so the built-in figures stay comparable across versions).

Speed, measured on this project's 2-core machine: ~1.6 ms of synthesis and ~0.4 ms of resampling
per utterance of ~1.3 s (about 600x real time per core), plus ~2 ms to record a training one.
``synthesize_many`` spreads chunks over a fork process pool in which every chunk gets its own engine.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Sequence

import numpy as np

from polymodal.data.augment_audio import resample
from polymodal.datasets.spoken_numbers import flite, recording
from polymodal.datasets.spoken_numbers.espeak import ENGINE_LOCK
from polymodal.datasets.spoken_numbers.espeak import ACCENTS, EspeakEngine, VoiceConfig, data_path
from polymodal.datasets.spoken_numbers.flite import FliteVoice
from polymodal.errors import DataError

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class VoiceRanges:
    """Where voices are drawn: pitch on espeak's 0..100 scale (default 50) and rate in words per
    minute (espeak's default 175), both inclusive; the slowest rate by the number's digit count
    (longer numbers take the last)."""

    pitch: tuple[int, int]
    slowest_rate: tuple[int, ...]
    fastest_rate: int


# Validation and test speech: version 1's ranges, so the main job's figures stay comparable.
EVALUATION_VOICES = VoiceRanges(pitch=(25, 75), slowest_rate=(175,), fastest_rate=250)
# Training speech: most of espeak's pitch scale, and slower talkers for short numbers: a lone digit
# at 100 wpm lasts ~0.7 s and "fourteen" at 120 wpm ~0.8 s, as a careful real talker (or a phone
# prompt) says them; "777" at 175 wpm lasts ~1.75 s, inside the 2 s crop.
TRAINING_VOICES = VoiceRanges(pitch=(10, 90), slowest_rate=(100, 120, 175), fastest_rate=260)
PEAK_LEVEL = 0.9  # every utterance is scaled to this peak: espeak's raw level varies 10x by variant
SILENCE_LEVEL = 1e-3  # |x| below this (of full scale) at either end counts as silence
EDGE_MARGIN_S = 0.01  # silence kept before and after the speech when trimming
SYNTH_CHUNK = 256  # requests per fresh engine in synthesize_many (part of the output's definition)
INT16_SCALE = 32768.0


@functools.lru_cache(maxsize=1)
def voice_variants() -> tuple[str, ...]:
    """Names of the voice variants (the files of espeak-ng-data/voices/!v), sorted."""
    folder = data_path() / "voices" / "!v"
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))
    if not names:
        raise DataError(f"no voice variants in {folder}; reinstall espeakng-loader")
    return names


def random_voice(
    rng: np.random.Generator, *, digits: int = 3, ranges: VoiceRanges = EVALUATION_VOICES
) -> VoiceConfig:
    """A voice with uniformly drawn accent, variant, rate and pitch (four draws from ``rng``), the
    rate from the slowest of a ``digits``-digit number in ``ranges`` up to its fastest."""
    variants = voice_variants()
    accent = ACCENTS[int(rng.integers(len(ACCENTS)))]
    variant = variants[int(rng.integers(len(variants)))]
    slowest = ranges.slowest_rate[min(digits, len(ranges.slowest_rate)) - 1]
    rate = int(rng.integers(slowest, ranges.fastest_rate + 1))
    pitch = int(rng.integers(ranges.pitch[0], ranges.pitch[1] + 1))
    return VoiceConfig(voice=f"{accent}+{variant}", rate=rate, pitch=pitch)


def _speech_span(wave: np.ndarray, native_rate: int) -> tuple[int, int]:
    """[start, stop) of ``wave`` (native int16) with its silent ends trimmed, EDGE_MARGIN_S kept."""
    loud = np.flatnonzero(np.abs(wave.astype(np.float32) / INT16_SCALE) > SILENCE_LEVEL)
    if loud.size == 0:
        raise RuntimeError("the synthesizer produced silence")
    margin = int(EDGE_MARGIN_S * native_rate)
    return max(0, int(loud[0]) - margin), int(loud[-1]) + 1 + margin


def _postprocess(wave: np.ndarray, native_rate: int, sample_rate: int) -> np.ndarray:
    """Trim silent ends, resample, scale to PEAK_LEVEL. (T_native,) int16 -> (T,) float32."""
    start, stop = _speech_span(wave, native_rate)
    x = wave[start:stop].astype(np.float32) / INT16_SCALE
    if sample_rate != native_rate:
        x = resample(x, native_rate, sample_rate).astype(np.float32)
    return x * np.float32(PEAK_LEVEL / max(float(np.abs(x).max()), 1e-6))


def to_int16(x: np.ndarray) -> np.ndarray:
    """(T,) float in [-1, 1] -> (T,) int16."""
    return np.clip(np.round(x * INT16_SCALE), -32768, 32767).astype(np.int16)


def synthesize(text: str, *, voice: VoiceConfig = VoiceConfig(), sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speak ``text`` with a fresh engine: the result depends on the arguments only.

    Returns:
        (T,) float32 in [-1, 1] at ``sample_rate``, silent ends trimmed, peak PEAK_LEVEL.
    """
    with ENGINE_LOCK, EspeakEngine() as engine:
        wave = engine.synthesize(text, voice, seed=seed)
        return _postprocess(wave, engine.native_rate, sample_rate)


def synthesize_words(
    texts: Sequence[str], *, voice: VoiceConfig = VoiceConfig(), sample_rate: int = 16000, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Speak each text with one fresh engine, and say where its words start (espeak's word events).

    Returns:
        per text: (T,) float32 waveform as ``synthesize`` makes it, and (W,) int64 sample index (at
        ``sample_rate``, in the trimmed waveform, clipped to [0, T)) of each word's start.
    """
    out = []
    with ENGINE_LOCK, EspeakEngine() as engine:
        for text in texts:
            raw, starts = engine.synthesize_timed(text, voice, seed=seed)
            begin, _ = _speech_span(raw, engine.native_rate)
            wave = _postprocess(raw, engine.native_rate, sample_rate)
            starts = np.round((starts - begin) * (sample_rate / engine.native_rate)).astype(np.int64)
            out.append((wave, np.clip(starts, 0, max(len(wave) - 1, 0))))
    return out


@functools.lru_cache(maxsize=1)
def espeak_version() -> str:
    """The espeak-ng library version (part of the built-in data's cache key)."""
    with EspeakEngine() as engine:
        return engine.version


Job = tuple[list[str], list[VoiceConfig], list[int], int, list[int], list[FliteVoice | None]]


def synth_chunk(job: Job) -> tuple[np.ndarray, np.ndarray]:
    """Speak one chunk (from ``chunk_jobs``) with one fresh engine; runs in a pool worker. A request
    with a flite voice is spoken by flite instead (``flite.py``), and one with a recording seed
    (>= 0) is then recorded (``recording.record``).

    Returns:
        audio: (sum T_i,) int16 at the job's sample rate.
        lengths: (n,) int64 samples per utterance.
    """
    texts, voices, seeds, sample_rate, recordings, flite_voices = job
    waves = []
    with ENGINE_LOCK, EspeakEngine() as engine:
        for text, voice, seed, recorded, other in zip(texts, voices, seeds, recordings, flite_voices):
            # espeak speaks every request, even one flite then speaks: the engine's history, and so
            # every other utterance of the chunk, stays what it is without flite.
            wave = engine.synthesize(text, voice, seed=seed)
            if other is None:
                wave = _postprocess(wave, engine.native_rate, sample_rate)
            else:
                wave = _postprocess(*flite.synthesize_native(text, other, seed=seed), sample_rate)
            if recorded >= 0:
                wave = recording.record(wave, sample_rate, recorded)
            waves.append(to_int16(wave))
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    return (np.concatenate(waves) if waves else np.zeros(0, np.int16)), lengths


def chunk_jobs(
    texts: Sequence[str],
    voices: Sequence[VoiceConfig],
    seeds: Sequence[int],
    *,
    sample_rate: int,
    recordings: Sequence[int] | None = None,
    flite_voices: Sequence[FliteVoice | None] | None = None,
) -> list[Job]:
    """Cut N requests into jobs of SYNTH_CHUNK for ``synth_chunk``. The cut is fixed (it decides
    where fresh engines start), so the audio does not depend on how the jobs are scheduled.
    ``recordings``: per request a recording seed, or -1 to keep it clean (None: all clean).
    ``flite_voices``: per request a flite voice that speaks it instead, or None (None: espeak
    speaks every request)."""
    recordings = [-1] * len(texts) if recordings is None else list(recordings)
    flite_voices = [None] * len(texts) if flite_voices is None else list(flite_voices)
    if not len(texts) == len(voices) == len(seeds) == len(recordings) == len(flite_voices):
        lengths = ", ".join(str(len(x)) for x in (texts, voices, seeds, recordings, flite_voices))
        raise ValueError(f"texts, voices, seeds, recordings and flite voices differ in length: {lengths}")
    return [
        (
            list(texts[i : i + SYNTH_CHUNK]),
            list(voices[i : i + SYNTH_CHUNK]),
            [int(s) for s in seeds[i : i + SYNTH_CHUNK]],
            sample_rate,
            [int(r) for r in recordings[i : i + SYNTH_CHUNK]],
            flite_voices[i : i + SYNTH_CHUNK],
        )
        for i in range(0, len(texts), SYNTH_CHUNK)
    ]


def join_chunks(results: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``synth_chunk`` results in job order -> audio (sum T_i,) int16 and offsets (N + 1,) int64."""
    lengths = np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    audio = np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int16)
    return audio, offsets


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on macOS / Windows
        return os.cpu_count() or 1


def worker_pool(num_workers: int | None) -> multiprocessing.pool.Pool | None:
    """A fork process pool of ``num_workers`` (None: every core), or None when one worker will do
    or fork is unavailable. Fork: workers start in milliseconds and inherit loaded modules and data;
    each synthesis chunk still opens its own private engine, so no espeak state is inherited."""
    workers = num_workers or default_workers()
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork").Pool(workers)


def synthesize_many(
    texts: Sequence[str],
    voices: Sequence[VoiceConfig],
    seeds: Sequence[int],
    *,
    sample_rate: int = 16000,
    num_workers: int | None = None,
    recordings: Sequence[int] | None = None,
    flite_voices: Sequence[FliteVoice | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Speak many texts, in chunks of SYNTH_CHUNK spread over a fork process pool.

    Args:
        texts: N texts.
        voices: N voice configs.
        seeds: N noise seeds.
        sample_rate: output rate in Hz.
        recordings: N recording seeds (-1: clean), or None for all clean.
        flite_voices: N flite voices that speak their request instead of espeak (None where
            espeak does), or None for espeak throughout.
        num_workers: processes; None uses every core this process may use. Does not change the output.

    Returns:
        audio: (sum T_i,) int16, the utterances one after another.
        offsets: (N + 1,) int64; utterance i is ``audio[offsets[i]:offsets[i + 1]]``.
    """
    jobs = chunk_jobs(texts, voices, seeds, sample_rate=sample_rate, recordings=recordings, flite_voices=flite_voices)
    pool = worker_pool(min(num_workers or default_workers(), len(jobs)))
    if pool is None:
        return join_chunks([synth_chunk(job) for job in jobs])
    with pool:
        return join_chunks(pool.map(synth_chunk, jobs, chunksize=1))
