"""espeak-ng called in-process through ctypes: a private engine per instance, with word events.

Engine: espeak-ng formant synthesis (https://github.com/espeak-ng/espeak-ng), the shared library
and voice data of the ``espeakng-loader`` wheel. C API: ``espeak_Initialize`` in synchronous mode
with a callback that collects 16-bit chunks, ``espeak_SetVoiceByName("<accent>+<variant>")``,
``espeak_SetParameter`` (rate in words per minute, pitch 0..100), ``espeak_ng_SetRandSeed``,
``espeak_Synth``; the word events the callback receives tell where each word starts.

Determinism. espeak keeps state in C statics that survive ``espeak_Terminate``/``espeak_Initialize``
(the glottal phase, the echo buffer of some variants, a noise generator seeded from the clock), so
the same request gives a different waveform depending on what was spoken before in that process.
An ``EspeakEngine`` therefore loads its own private copy of the library (the .so copied to a temp
file, opened RTLD_LOCAL): a new engine starts from pristine statics, whatever else the process did.
One engine is not thread-safe: an instance must stay in one thread.
"""

from __future__ import annotations

import _ctypes
import ctypes
import dataclasses
import os
import shutil
import tempfile
import logging
import threading
from pathlib import Path

import numpy as np

from polymodal.errors import DataError

logger = logging.getLogger(__name__)

# Eight English accents of espeak-ng-data/lang/gmw (names are case-insensitive for espeak).
ACCENTS = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
    "en-us-nyc",
)  # fmt: skip
# words per minute, inclusive; espeak's default is 175. The slowest rate keeps the longest 3-digit
# number ("777") within about 2 s, the data config's default audio crop.
DEFAULT_RATE = 175
DEFAULT_PITCH = 50

# espeak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_EE_OK = 0
_BUFFER_MS = 1000  # one callback per utterance instead of one per 60 ms (~10% faster)
ENGINE_LOCK = threading.RLock()  # libc's rand() is shared by every engine in the process (and flite.py)
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
