"""A user's own data: a JSONL manifest, one sample per line, any subset of modalities.

Each line is a JSON object such as ``{"image": "a.png", "text": "a cat", "audio": "a.wav", "label": 3}``;
media paths are relative to the manifest's folder (absolute paths are kept). Any other field
(``"speaker": "george"``) is metadata: kept in ``entries`` and ``metadata(i)``, and available to
break evaluation figures down (``polymodal eval --by``); ``speaker`` alone is also read by
``data.speaker_norm`` (``Sample.speaker``). Bad lines are skipped when the manifest is read, bad
media files when a sample is loaded; both are counted with the reason in ``skipped`` and logged
once, so one broken file never stops a training run (a manifest none of whose media files exists
does stop: its relative paths were written from another folder). A line is
usable when it is a JSON object with no near-miss of a known key ("imgae"), its media paths and
text are strings (valid Unicode), and its label is an integer that fits in int64; anything else in
a line is a reason to skip it, never an error: lines are split on newlines only and decoded one by one, so a line that
is not UTF-8 costs that line alone.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from polymodal.config import DataConfig
from polymodal.data.audio import load_audio
from polymodal.data.batch import Sample
from polymodal.data.files import is_file
from polymodal.data.image import load_image
from polymodal.data.speaker_norm import SPEAKER_KEY
from polymodal.errors import DataError
from polymodal.modality import Modality

if TYPE_CHECKING:
    from polymodal.config import DataConfig

logger = logging.getLogger(__name__)

MEDIA_KEYS = (Modality.IMAGE.value, Modality.AUDIO.value)  # values are file paths
MODALITY_KEYS = tuple(m.value for m in Modality)
LABEL_KEY = "label"
UNKNOWN_LABEL = -1
# A field this close (difflib's ratio) to a modality or the label is a typo, not metadata: "imgae".
TYPO_CUTOFF = 0.75
LABEL_RANGE = (-(2**63), 2**63 - 1)  # labels become an int64 tensor
UTF8_BOM = "\ufeff"
MAX_SHOWN_CHARS = 60  # a bad value quoted in a skip reason, cut to this


class ManifestDataset(Dataset):
    """Samples listed in a JSONL manifest. ``dataset[i]`` is a ``Sample``, or None if it failed to load.

    Skips are recorded in ``skipped`` (``"<manifest>:<line>"`` or a media path -> reason). With
    ``DataLoader(num_workers > 0)`` samples load in worker processes, whose records do not reach
    this object; call ``scan()`` first for a complete list, or count the Nones in the collator.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_height: int,
        image_width: int,
        channels: int = 1,
        sample_rate: int,
        max_audio_seconds: float,
    ) -> None:
        self.path = Path(path)
        self.image_height = image_height
        self.image_width = image_width
        self.channels = channels
        self.sample_rate = sample_rate
        self.max_audio_seconds = max_audio_seconds
        self.max_audio_samples = int(round(max_audio_seconds * sample_rate))
        self.skipped: dict[str, str] = {}
        self._failed_items: set[int] = set()  # indices whose media failed to load
        self._num_bad_lines = 0
        if not self.path.is_file():
            raise DataError(f"manifest {self.path} does not exist; give a JSONL file with one sample per line")
        self.root = self.path.parent
        self.entries: list[dict[str, Any]] = self._read_lines()
        if not self.entries:
            raise DataError(
                f"manifest {self.path} has no usable line ({len(self.skipped)} skipped); each line needs "
                f'one of {", ".join(MODALITY_KEYS)}, e.g. {{"image": "a.png", "text": "a cat"}}'
            )
        self._check_media_found()

    def _check_media_found(self) -> None:
        """Raise when the manifest names media files and not one of them exists.

        A missing file is otherwise a damaged sample, skipped when it is loaded. When every one is
        missing, the paths were written relative to another folder: training would go on with no
        media at all (or only generated additions), and evaluation would score nothing. The scan
        stops at the first file found, so a sound manifest costs one ``stat``.
        """
        paths = (
            self.media_path(entry[key]) for entry in self.entries for key in MEDIA_KEYS if entry.get(key) is not None
        )
        first_missing = None
        for path in paths:
            if is_file(path):
                return
            first_missing = first_missing or path
        if first_missing is not None:
            raise DataError(
                f"manifest {self.path}: none of its media files exists (the first: {first_missing}); relative "
                f"paths are read from the manifest's folder {self.root}: write them relative to it, or absolute"
            )

    @classmethod
    def from_config(cls, path: str | Path, data: "DataConfig") -> "ManifestDataset":
        """The manifest at ``path``, its media read as ``data`` (a ``DataConfig``) says: image size
        and channels, sample rate, the audio cut."""
        return cls(
            path, image_height=data.image_height, image_width=data.image_width, channels=data.image_channels,
            sample_rate=data.sample_rate, max_audio_seconds=data.max_audio_seconds,
        )  # fmt: skip

    @property
    def num_skipped(self) -> int:
        """Manifest lines skipped plus samples that failed to load so far."""
        return self._num_bad_lines + len(self._failed_items)

    def _skip(self, key: str, reason: str) -> None:
        if key not in self.skipped:  # warn once per bad line or file
            logger.warning("skipping %s: %s", key, reason)
            self.skipped[key] = reason

    def _read_lines(self) -> list[dict[str, Any]]:
        entries = []
        try:
            # bytes.splitlines splits on \r and \n only; str.splitlines would also cut a line at a
            # U+2028 inside a JSON string.
            lines = self.path.read_bytes().splitlines()
        except OSError as exc:
            raise DataError(f"manifest {self.path} cannot be read: {exc}") from None
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            entry, reason = self._parse(raw, first=number == 1)
            if reason is None:
                reason = self._check_entry(entry)
            if reason is not None:
                self._num_bad_lines += 1
                self._skip(f"{self.path}:{number}", reason)
                continue
            entries.append(entry)
        return entries

    @staticmethod
    def _parse(raw: bytes, *, first: bool) -> tuple[Any, str | None]:
        """One line's JSON value, or why it has none."""
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        if first:
            line = line.removeprefix(UTF8_BOM)  # written by some Windows editors
        try:
            return json.loads(line), None
        except json.JSONDecodeError as exc:
            return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
        except ValueError as exc:  # an integer literal over Python's digit limit
            return None, f"not usable JSON ({exc})"
        except RecursionError:
            return None, "JSON nested too deeply"

    @staticmethod
    def _check_entry(entry: Any) -> str | None:
        """Why a parsed line is unusable, or None if it is fine."""
        if not isinstance(entry, dict):
            return f"expected a JSON object, got {type(entry).__name__}"
        for key in entry:
            near = difflib.get_close_matches(key, (*MODALITY_KEYS, LABEL_KEY), n=1, cutoff=TYPO_CUTOFF)
            if key not in (*MODALITY_KEYS, LABEL_KEY) and near:
                return f"unknown key {key!r}: did you mean {near[0]!r}? (other fields are kept as metadata)"
        if all(entry.get(k) is None for k in MODALITY_KEYS):
            return f"no modality: give at least one of {', '.join(MODALITY_KEYS)}"
        for key in MODALITY_KEYS:
            value = entry.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                return f"{key!r} must be a string, got {_short(value)}"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate, from an escape such as "\ud800"
                return f"{key!r} is not valid Unicode (a lone surrogate)"
        label = entry.get(LABEL_KEY, UNKNOWN_LABEL)
        if isinstance(label, bool) or not isinstance(label, int):
            return f"'label' must be an integer, got {_short(label)}"
        if not LABEL_RANGE[0] <= label <= LABEL_RANGE[1]:
            return f"'label' {_short(label)} does not fit in a 64-bit integer"
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def metadata(self, index: int) -> dict[str, Any]:
        """The line's fields beyond the modalities and the label (e.g. ``{"speaker": "george"}``)."""
        return {k: v for k, v in self.entries[index].items() if k not in (*MODALITY_KEYS, LABEL_KEY)}

    def media_path(self, relative: str) -> Path:
        """A manifest path resolved against the manifest's folder (``~`` expanded where it can be)."""
        path = Path(relative)
        try:
            path = path.expanduser()
        except RuntimeError:  # "~someone" naming no user: the path is taken as written
            pass
        return path if path.is_absolute() else self.root / path

    def failure(self, index: int) -> tuple[str, str] | None:
        """(the file, the reason) when the line at ``index`` failed to load, else None."""
        for key in MEDIA_KEYS:
            value = self.entries[index].get(key)
            path = None if value is None else str(self.media_path(value))
            if path in self.skipped:
                return path, self.skipped[path]
        return None

    def __getitem__(self, index: int) -> Sample | None:
        entry = self.entries[index]
        image = audio = None
        current = None
        try:
            if entry.get(Modality.IMAGE.value) is not None:
                current = self.media_path(entry[Modality.IMAGE.value])
                image = load_image(current, height=self.image_height, width=self.image_width, channels=self.channels)
            if entry.get(Modality.AUDIO.value) is not None:
                current = self.media_path(entry[Modality.AUDIO.value])
                # Long clips are cut, and read only as far as the cut.
                audio = load_audio(current, sample_rate=self.sample_rate, max_seconds=self.max_audio_seconds)
        except DataError as exc:
            self._failed_items.add(index)
            self._skip(str(current), str(exc))
            return None
        text = entry.get(Modality.TEXT.value)
        speaker = entry.get(SPEAKER_KEY)
        return Sample(
            image=image, text=text, audio=audio, label=entry.get(LABEL_KEY, UNKNOWN_LABEL),
            speaker=None if speaker is None else str(speaker),
        )  # fmt: skip

    def scan(self) -> int:
        """Load every sample once so ``skipped`` lists every bad file. Returns the number loadable."""
        return sum(self[i] is not None for i in range(len(self)))


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a skip reason quotes the value, not a megabyte of it."""
    # repr of a huge int is slow, or refused over 4,300 digits; 4 bits per digit keeps this one short
    if isinstance(value, int) and value.bit_length() > 4 * MAX_SHOWN_CHARS:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."
