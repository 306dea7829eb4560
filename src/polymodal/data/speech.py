"""Text to speech with espeak-ng, called in-process through ctypes, resampled to the dataset's rate.

Engine: espeak-ng formant synthesis (https://github.com/espeak-ng/espeak-ng), the shared library
and voice data of the ``espeakng-loader`` wheel. C API: ``espeak_Initialize`` in synchronous mode
with a callback that collects 16-bit chunks, ``espeak_SetVoiceByName("<accent>+<variant>")``,
``espeak_SetParameter`` (rate in words per minute, pitch 0..100), ``espeak_ng_SetRandSeed``,
``espeak_Synth``. Output is at espeak's native rate (22,050 Hz), brought to the requested rate by
polyphase resampling (``scipy.signal.resample_poly``) with a filter designed once per rate pair.

Determinism. espeak keeps state in C statics that survive ``espeak_Terminate``/``espeak_Initialize``
(the glottal phase, the echo buffer of some variants, a noise generator seeded from the clock), so
the same request gives a different waveform depending on what was spoken before in that process.
An ``EspeakEngine`` therefore loads its own private copy of the library (the .so copied to a temp
file, opened RTLD_LOCAL): a new engine starts from pristine statics, whatever else the process did.
``synthesize`` uses a fresh engine per call (a pure function, ~1.5 ms to set up);
``synthesize_many`` uses a fresh engine per fixed chunk of ``SYNTH_CHUNK`` requests, so the output
depends only on the requests, not on the number of workers or the process history.

Speed, measured on this project's 2-core machine: ~1.6 ms of synthesis and ~0.4 ms of resampling
per utterance of ~1.3 s (about 600x real time per core). One engine is not thread-safe; an engine
instance must stay in one thread, and ``synthesize_many`` spreads chunks over a fork process pool
in which every chunk gets its own engine.
"""

from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import functools
import logging
import math
import multiprocessing
import multiprocessing.pool
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.signal

from polymodal.errors import DataError

logger = logging.getLogger(__name__)

# Eight English accents of espeak-ng-data/lang/gmw (names are case-insensitive for espeak).
ACCENTS = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
    "en-us-nyc",
)  # fmt: skip
# words per minute, inclusive; espeak's default is 175. The slowest rate keeps the longest 3-digit
# number ("777") within about 2 s, the data config's default audio crop.
RATE_RANGE = (175, 250)
PITCH_RANGE = (25, 75)  # espeak's 0..100 scale, inclusive; default 50
DEFAULT_RATE = 175
DEFAULT_PITCH = 50
PEAK_LEVEL = 0.9  # every utterance is scaled to this peak: espeak's raw level varies 10x by variant
SILENCE_LEVEL = 1e-3  # |x| below this (of full scale) at either end counts as silence
EDGE_MARGIN_S = 0.01  # silence kept before and after the speech when trimming
SYNTH_CHUNK = 256  # requests per fresh engine in synthesize_many (part of the output's definition)
INT16_SCALE = 32768.0

# espeak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0
_BUFFER_MS = 1000  # one callback per utterance instead of one per 60 ms (~10% faster)
_ENGINE_LOCK = threading.Lock()  # libc's rand() is shared by every engine in the process
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1


class _Event(ctypes.Structure):
    """espeak_EVENT of speak_lib.h: the events array a synth callback gets ends with type 0."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # native samples since the start of the utterance
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


@dataclasses.dataclass(frozen=True)
class VoiceConfig:
    """How one utterance is spoken.

    Attributes:
        voice: ``"<accent>"`` or ``"<accent>+<variant>"``, e.g. ``"en-gb-scotland+m3"``.
        rate: words per minute (espeak accepts 80..450).
        pitch: base pitch on espeak's 0..100 scale.
    """

    voice: str = "en"
    rate: int = DEFAULT_RATE
    pitch: int = DEFAULT_PITCH


def _loader():
    try:
        import espeakng_loader
    except ImportError:
        raise DataError("speech synthesis needs espeak-ng; run: pip install espeakng-loader") from None
    return espeakng_loader


def data_path() -> Path:
    """The espeak-ng-data folder shipped with espeakng-loader."""
    return Path(_loader().get_data_path())


@functools.lru_cache(maxsize=1)
def voice_variants() -> tuple[str, ...]:
    """Names of the voice variants (the files of espeak-ng-data/voices/!v), sorted."""
    folder = data_path() / "voices" / "!v"
    names = tuple(sorted(p.name for p in folder.iterdir() if p.is_file()))
    if not names:
        raise DataError(f"no voice variants in {folder}; reinstall espeakng-loader")
    return names


def random_voice(rng: np.random.Generator) -> VoiceConfig:
    """A voice with uniformly drawn accent, variant, rate and pitch (four draws from ``rng``)."""
    variants = voice_variants()
    accent = ACCENTS[int(rng.integers(len(ACCENTS)))]
    variant = variants[int(rng.integers(len(variants)))]
    rate = int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1))
    pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
    return VoiceConfig(voice=f"{accent}+{variant}", rate=rate, pitch=pitch)


class EspeakEngine:
    """A private instance of libespeak-ng with pristine state. Use from one thread; close when done.

    Example:
        with EspeakEngine() as engine:
            wave = engine.synthesize("forty two", VoiceConfig("en-us+m3"), seed=0)  # (T,) int16
    """

    def __init__(self) -> None:
        loader = _loader()
        self._lib = self._open_private(loader.get_library_path())
        lib = self._lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        data = loader.get_data_path().encode()
        self.native_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data, 0)
        if self.native_rate <= 0:
            raise DataError(f"espeak-ng failed to start with data {loader.get_data_path()}; reinstall espeakng-loader")
        self._chunks: list[np.ndarray] = []
        self._word_starts: list[int] | None = None  # collected only by synthesize_timed
        # The ctypes callback must outlive every espeak_Synth call: keep it on the engine.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        try:  # klatt variants draw noise from libc's rand(); reseed it with espeak's own generator
            self._libc = ctypes.CDLL(None)
        except OSError:
            self._libc = None
        self.version = lib.espeak_Info(None).decode()

    @staticmethod
    def _open_private(library: str) -> ctypes.CDLL:
        """Load a copy of the library under a unique name, so its C statics are new (see header)."""
        folder = tempfile.mkdtemp(prefix="polymodal-espeak-")
        copy = os.path.join(folder, os.path.basename(library))
        try:
            shutil.copyfile(library, copy)
            return ctypes.CDLL(copy, mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError as exc:  # e.g. a temp folder mounted noexec
            logger.warning("cannot load a private espeak-ng copy (%s); outputs may depend on history", exc)
            return ctypes.CDLL(library)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the mapping stays valid once loaded

    def _collect(self, wav, num_samples: int, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        if self._word_starts is not None and events:
            event = ctypes.cast(events, ctypes.POINTER(_Event))
            i = 0
            while event[i].type != _EVENT_LIST_TERMINATED:
                if event[i].type == _EVENT_WORD:
                    self._word_starts.append(int(event[i].sample))
                i += 1
        return 0  # 0: go on synthesising

    def synthesize_timed(self, text: str, config: VoiceConfig, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``synthesize``, and where each spoken word starts.

        Returns:
            (T,) int16 at ``self.native_rate``, and (W,) int64 native sample index of each word's
            start, one per word espeak reads (a numeral such as "42" is one word to espeak).
        """
        self._word_starts = []
        try:
            wave = self.synthesize(text, config, seed=seed)
            return wave, np.asarray(self._word_starts, dtype=np.int64)
        finally:
            self._word_starts = None

    def synthesize(self, text: str, config: VoiceConfig, *, seed: int) -> np.ndarray:
        """Speak ``text`` at the native rate.

        Args:
            text: what to say.
            config: voice, rate and pitch.
            seed: seeds espeak's noise (breathy and whispered variants).

        Returns:
            (T,) int16 at ``self.native_rate``.
        """
        lib = self._lib
        if lib.espeak_SetVoiceByName(config.voice.encode()) != _EE_OK:
            raise ValueError(f"espeak-ng has no voice {config.voice!r}; accents: {', '.join(ACCENTS)}")
        lib.espeak_SetParameter(_PARAM_RATE, int(config.rate), 0)
        lib.espeak_SetParameter(_PARAM_PITCH, int(config.pitch), 0)
        lib.espeak_ng_SetRandSeed(int(seed) & 0x7FFFFFFF)
        if self._libc is not None:
            self._libc.srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))
        self._chunks.clear()
        data = text.encode("utf-8") + b"\0"
        status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise RuntimeError(f"espeak-ng failed (status {status}) on {text!r} with {config}")
        wave = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks.clear()
        return wave

    def close(self) -> None:
        """Stop espeak and unload this private copy."""
        if self._lib is None:
            return
        self._lib.espeak_Terminate()
        try:
            _ctypes.dlclose(self._lib._handle)
        except (AttributeError, OSError):  # not on every platform; the copy then stays mapped
            pass
        self._lib = None

    def __enter__(self) -> "EspeakEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=8)
def _resample_filter(up: int, down: int) -> np.ndarray:
    """The Kaiser-windowed low-pass that resample_poly would design on each call (designed once)."""
    max_rate = max(up, down)
    half_len = 10 * max_rate  # scipy's default filter length for resample_poly
    return scipy.signal.firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0))


def _speech_span(wave: np.ndarray, native_rate: int) -> tuple[int, int]:
    """[start, stop) of ``wave`` (native int16) with its silent ends trimmed, EDGE_MARGIN_S kept."""
    loud = np.flatnonzero(np.abs(wave.astype(np.float32) / INT16_SCALE) > SILENCE_LEVEL)
    if loud.size == 0:
        raise RuntimeError("espeak-ng produced silence")
    margin = int(EDGE_MARGIN_S * native_rate)
    return max(0, int(loud[0]) - margin), int(loud[-1]) + 1 + margin


def _postprocess(wave: np.ndarray, native_rate: int, sample_rate: int) -> np.ndarray:
    """Trim silent ends, resample, scale to PEAK_LEVEL. (T_native,) int16 -> (T,) float32."""
    start, stop = _speech_span(wave, native_rate)
    x = wave[start:stop].astype(np.float32) / INT16_SCALE
    if sample_rate != native_rate:
        g = math.gcd(sample_rate, native_rate)
        up, down = sample_rate // g, native_rate // g
        x = scipy.signal.resample_poly(x, up, down, window=_resample_filter(up, down)).astype(np.float32)
    return x * np.float32(PEAK_LEVEL / max(float(np.abs(x).max()), 1e-6))


def to_int16(x: np.ndarray) -> np.ndarray:
    """(T,) float in [-1, 1] -> (T,) int16."""
    return np.clip(np.round(x * INT16_SCALE), -32768, 32767).astype(np.int16)


def synthesize(text: str, *, voice: VoiceConfig = VoiceConfig(), sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Speak ``text`` with a fresh engine: the result depends on the arguments only.

    Returns:
        (T,) float32 in [-1, 1] at ``sample_rate``, silent ends trimmed, peak PEAK_LEVEL.
    """
    with _ENGINE_LOCK, EspeakEngine() as engine:
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
    with _ENGINE_LOCK, EspeakEngine() as engine:
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


def synth_chunk(job: tuple[list[str], list[VoiceConfig], list[int], int]) -> tuple[np.ndarray, np.ndarray]:
    """Speak one chunk (from ``chunk_jobs``) with one fresh engine; runs in a pool worker.

    Returns:
        audio: (sum T_i,) int16 at the job's sample rate.
        lengths: (n,) int64 samples per utterance.
    """
    texts, voices, seeds, sample_rate = job
    waves = []
    with _ENGINE_LOCK, EspeakEngine() as engine:
        for text, voice, seed in zip(texts, voices, seeds):
            raw = engine.synthesize(text, voice, seed=seed)
            waves.append(to_int16(_postprocess(raw, engine.native_rate, sample_rate)))
    lengths = np.array([len(w) for w in waves], dtype=np.int64)
    return (np.concatenate(waves) if waves else np.zeros(0, np.int16)), lengths


def chunk_jobs(
    texts: Sequence[str], voices: Sequence[VoiceConfig], seeds: Sequence[int], *, sample_rate: int
) -> list[tuple[list[str], list[VoiceConfig], list[int], int]]:
    """Cut N requests into jobs of SYNTH_CHUNK for ``synth_chunk``. The cut is fixed (it decides
    where fresh engines start), so the audio does not depend on how the jobs are scheduled."""
    if not len(texts) == len(voices) == len(seeds):
        raise ValueError(f"texts, voices and seeds differ in length: {len(texts)}, {len(voices)}, {len(seeds)}")
    return [
        (
            list(texts[i : i + SYNTH_CHUNK]),
            list(voices[i : i + SYNTH_CHUNK]),
            [int(s) for s in seeds[i : i + SYNTH_CHUNK]],
            sample_rate,
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
) -> tuple[np.ndarray, np.ndarray]:
    """Speak many texts, in chunks of SYNTH_CHUNK spread over a fork process pool.

    Args:
        texts: N texts.
        voices: N voice configs.
        seeds: N noise seeds.
        sample_rate: output rate in Hz.
        num_workers: processes; None uses every core this process may use. Does not change the output.

    Returns:
        audio: (sum T_i,) int16, the utterances one after another.
        offsets: (N + 1,) int64; utterance i is ``audio[offsets[i]:offsets[i + 1]]``.
    """
    jobs = chunk_jobs(texts, voices, seeds, sample_rate=sample_rate)
    pool = worker_pool(min(num_workers or default_workers(), len(jobs)))
    if pool is None:
        return join_chunks([synth_chunk(job) for job in jobs])
    with pool:
        return join_chunks(pool.map(synth_chunk, jobs, chunksize=1))
