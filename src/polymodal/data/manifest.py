"""A user's own data: a JSONL manifest, one sample per line, any subset of modalities.

Each line is a JSON object such as ``{"image": "a.png", "text": "a cat", "audio": "a.wav", "label": 3}``;
media paths are relative to the manifest's folder (absolute paths are kept). Any other field
(``"speaker": "george"``) is metadata: kept in ``entries`` and ``metadata(i)``, read by nothing in
training, and available to break evaluation figures down (``polymodal eval --by``). Bad lines are skipped
when the manifest is read, bad media files when a sample is loaded; both are counted with the
reason in ``skipped`` and logged once, so one broken file never stops a training run.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from polymodal.config import DataConfig
from polymodal.data.audio import load_audio
from polymodal.data.batch import Sample
from polymodal.data.image import load_image
from polymodal.errors import DataError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

MEDIA_KEYS = (Modality.IMAGE.value, Modality.AUDIO.value)  # values are file paths
MODALITY_KEYS = tuple(m.value for m in Modality)
LABEL_KEY = "label"
UNKNOWN_LABEL = -1
# A field this close (difflib's ratio) to a modality or the label is a typo, not metadata: "imgae".
TYPO_CUTOFF = 0.75


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

    @classmethod
    def for_data(cls, path: str | Path, data: DataConfig) -> "ManifestDataset":
        """The manifest read as ``data`` (a ``DataConfig``) says: image size and channels, rate, crop."""
        return cls(
            path,
            image_height=data.image_height,
            image_width=data.image_width,
            channels=data.image_channels,
            sample_rate=data.sample_rate,
            max_audio_seconds=data.max_audio_seconds,
        )

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
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"manifest {self.path} cannot be read as UTF-8 text: {exc}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            reason = None
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"not valid JSON ({exc.msg} at column {exc.colno})"
            else:
                reason = self._check_entry(entry)
            if reason is not None:
                self._num_bad_lines += 1
                self._skip(f"{self.path}:{number}", reason)
                continue
            entries.append(entry)
        return entries

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
            if entry.get(key) is not None and not isinstance(entry[key], str):
                return f"{key!r} must be a string, got {entry[key]!r}"
        label = entry.get(LABEL_KEY, UNKNOWN_LABEL)
        if isinstance(label, bool) or not isinstance(label, int):
            return f"'label' must be an integer, got {label!r}"
        return None

    def __len__(self) -> int:
        return len(self.entries)

    def metadata(self, index: int) -> dict[str, Any]:
        """The line's fields beyond the modalities and the label (e.g. ``{"speaker": "george"}``)."""
        return {k: v for k, v in self.entries[index].items() if k not in (*MODALITY_KEYS, LABEL_KEY)}

    def media_path(self, relative: str) -> Path:
        """A manifest path resolved against the manifest's folder."""
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.root / path

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
                audio = load_audio(current, sample_rate=self.sample_rate)[: self.max_audio_samples]  # cut long clips
        except DataError as exc:
            self._failed_items.add(index)
            self._skip(str(current), str(exc))
            return None
        text = entry.get(Modality.TEXT.value)
        return Sample(image=image, text=text, audio=audio, label=entry.get(LABEL_KEY, UNKNOWN_LABEL))

    def scan(self) -> int:
        """Load every sample once so ``skipped`` lists every bad file. Returns the number loadable."""
        return sum(self[i] is not None for i in range(len(self)))
