"""Flite voices called in-process through ctypes: a second family of synthetic talkers.

Why a second engine. A speech model trained only on espeak-ng's formant voices learns espeak's
way of making speech as much as the words. Flite (CMU's Festival-lite, https://github.com/festvox/flite,
Debian package ``flite``) makes speech in two other ways: diphone concatenation of a real man's
recordings (``kal``, ``kal16``) and statistical parametric "clustergen" voices trained on the CMU
ARCTIC recordings of three talkers (``awb``, Scottish male; ``rms``, US male; ``slt``, US female).
Half espeak and half flite read real spoken digits better than espeak alone at the same size
(BENCHMARKS.md, "Flite voices"). No PyPI package ships flite or an offline
neural voice, so it comes from the system: ``apt-get install flite``; without it this module
raises a ``DataError`` that says so.

C API (flite.h, 2.2): ``flite_init``; ``register_cmu_us_<name>(NULL)`` returns a ``cst_voice*``
whose second field is its feature set; ``flite_feat_set_float(features, "duration_stretch" |
"int_f0_target_mean", v)`` sets the pace and the mean pitch (the ``rms`` voice keeps its own pitch);
``flite_text_to_wave(text, voice)`` returns a ``cst_wave*`` of 16-bit samples, freed by
``delete_wave``.

Determinism. The clustergen voices draw their excitation noise from libc's ``rand()``, so the same
request speaks differently after other requests; seeding ``srand`` before each request (under the
process-wide ``ENGINE_LOCK`` that espeak's engines also hold) makes every utterance a function of
its text, voice and seed alone. The diphone voices draw nothing. The libraries are loaded once per
process; the voice features are set on every request, so nothing else carries over.

Speed on this project's 2-core machine, per digit word: kal16 ~2 ms, kal ~5 ms, slt ~32 ms,
rms ~41 ms, awb ~57 ms.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import threading

import numpy as np

from polymodal.datasets.spoken_numbers.espeak import ENGINE_LOCK
from polymodal.errors import DataError

# Every English voice Debian's flite ships, with the mean pitch (Hz) drawn for each: the female
# ``slt`` higher, the male voices lower.
VOICE_PITCH = {"kal": (80.0, 140.0), "kal16": (80.0, 140.0), "awb": (80.0, 140.0), "rms": (80.0, 140.0), "slt": (150.0, 230.0)}
VOICES = tuple(VOICE_PITCH)
# duration_stretch (1: the voice's own pace; larger is slower) drawn by the digit count of a number
# (longer numbers take the last): the slowest voice says "7" in 1.33 s at 1.5, "77" in 1.65 s at
# 1.2 and "777" in 1.76 s at 0.85, inside the data's 2 s crop.
STRETCH = ((0.8, 1.5), (0.7, 1.2), (0.6, 0.85))
INSTALL = "apt-get install flite (Debian/Ubuntu), or leave data.options.synthetic_flite (a manifest) or data.options.flite_share (the built-in data) at 0"
_LOCK = threading.Lock()  # loading and registering


@dataclasses.dataclass(frozen=True)
class FliteVoice:
    """How one utterance is spoken by flite.

    Attributes:
        name: one of ``VOICES``.
        stretch: duration stretch (1: the voice's own pace; 1.5: half as fast again).
        pitch: target mean F0 in Hz.
    """

    name: str = "kal16"
    stretch: float = 1.0
    pitch: float = 110.0


def random_flite_voice(rng: np.random.Generator, *, digits: int = 1) -> FliteVoice:
    """A voice with uniformly drawn name, stretch (from the range of a ``digits``-digit number)
    and pitch: three draws from ``rng``."""
    name = VOICES[int(rng.integers(len(VOICES)))]
    stretch = float(rng.uniform(*STRETCH[min(digits, len(STRETCH)) - 1]))
    pitch = float(rng.uniform(*VOICE_PITCH[name]))
    return FliteVoice(name=name, stretch=round(stretch, 4), pitch=round(pitch, 2))


class _Wave(ctypes.Structure):
    """cst_wave of cst_wave.h."""

    _fields_ = [
        ("type", ctypes.c_char_p),
        ("sample_rate", ctypes.c_int),
        ("num_samples", ctypes.c_int),
        ("num_channels", ctypes.c_int),
        ("samples", ctypes.POINTER(ctypes.c_short)),
    ]


class _Voice(ctypes.Structure):
    """The head of cst_voice (cst_voice.h): its name, then its feature set."""

    _fields_ = [("name", ctypes.c_char_p), ("features", ctypes.c_void_p)]


def _open(name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name, mode=getattr(os, "RTLD_GLOBAL", 0))
    except OSError:
        raise DataError(f"flite speech needs the system library {name}, which is not installed; run: {INSTALL}") from None


class _Flite:
    """The loaded libraries and registered voices of this process (one per process)."""

    def __init__(self) -> None:
        self.lib = _open("libflite.so.1")
        for dependency in ("libflite_usenglish.so.1", "libflite_cmulex.so.1"):
            _open(dependency)
        lib = self.lib
        lib.flite_init()
        lib.flite_text_to_wave.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.flite_text_to_wave.restype = ctypes.POINTER(_Wave)
        lib.flite_feat_set_float.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_float]
        lib.delete_wave.argtypes = [ctypes.POINTER(_Wave)]
        self.libc = ctypes.CDLL(None)
        self.voices: dict[str, ctypes.POINTER(_Voice)] = {}

    def voice(self, name: str):
        if name not in VOICE_PITCH:
            raise ValueError(f"flite has no voice {name!r} here; voices: {', '.join(VOICES)}")
        with _LOCK:
            if name not in self.voices:
                register = getattr(_open(f"libflite_cmu_us_{name}.so.1"), f"register_cmu_us_{name}")
                register.argtypes = [ctypes.c_char_p]
                register.restype = ctypes.POINTER(_Voice)
                self.voices[name] = register(None)
            return self.voices[name]


@functools.lru_cache(maxsize=1)
def _flite() -> _Flite:
    with _LOCK:
        return _Flite()


def available() -> bool:
    """Whether flite's libraries and voices load here."""
    try:
        loaded = _flite()
        for name in VOICES:
            loaded.voice(name)
    except DataError:
        return False
    return True


def flite_version() -> str:
    """The loaded libflite's file name, e.g. ``libflite.so.2.2`` (part of a cache key)."""
    _flite()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "/libflite.so" in line:
                    return os.path.basename(os.path.realpath(line.split()[-1]))
    except OSError:
        pass
    return "libflite.so.1"


def synthesize_native(text: str, voice: FliteVoice, *, seed: int) -> tuple[np.ndarray, int]:
    """Speak ``text``: a function of the arguments only (see the header).

    Returns:
        (T,) int16 at the voice's own rate, and that rate in Hz (8,000 for ``kal``, else 16,000).
    """
    loaded = _flite()
    handle = loaded.voice(voice.name)
    with ENGINE_LOCK:  # libc's rand() is shared with espeak's engines
        features = handle.contents.features
        loaded.lib.flite_feat_set_float(features, b"duration_stretch", float(voice.stretch))
        loaded.lib.flite_feat_set_float(features, b"int_f0_target_mean", float(voice.pitch))
        loaded.libc.srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))
        wave = loaded.lib.flite_text_to_wave(text.encode("utf-8"), handle)
        if not wave:
            raise RuntimeError(f"flite failed on {text!r} with {voice}")
        try:
            head = wave.contents
            samples = np.ctypeslib.as_array(head.samples, shape=(head.num_samples,)).copy() if head.num_samples else np.zeros(0, np.int16)
            rate = int(head.sample_rate)
        finally:
            loaded.lib.delete_wave(wave)
    return samples.astype(np.int16, copy=False), rate
