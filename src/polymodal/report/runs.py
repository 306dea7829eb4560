"""What the report reads from a run folder: the resolved config, the logged metrics by split, the
live-diagnostics records, the test figures and the samples. Any of them may be missing (a run
still training has no ``eval.json``; one without ``train.diagnostics`` no ``diagnostics.jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from polymodal.errors import ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
EVAL_FILE = "eval.json"
SAMPLES_DIR = "samples"
IMAGE_TOKENIZER_DIR = "image_tokenizer"  # a two-stage run's first stage (training/job.py)
RECONSTRUCTIONS = "reconstructions.png"
CAPTIONS = "captions.txt"
MAX_AUDIO = 8  # audio players per run: the samples/ folder holds 8 clips by default


@dataclasses.dataclass(frozen=True)
class Samples:
    """A run's samples as file bytes.

    Attributes:
        images: (title, PNG bytes): ``samples/*.png`` and the image tokenizer's reconstructions.
        audio: (file name, caption or "", WAV bytes), at most ``MAX_AUDIO``.
    """

    images: list[tuple[str, bytes]]
    audio: list[tuple[str, str, bytes]]


@dataclasses.dataclass(frozen=True)
class RunData:
    """One run folder, read.

    Attributes:
        name: what the report calls it (the folder's name, or the path when two share a name).
        path: the folder.
        config: the resolved config (``config.yaml``) as plain values; config_text its YAML.
        metrics: per split (``train``, ``val``, ``diag``), the logged entries in step order.
        diagnostics: the live-diagnostics records (``diagnostics.jsonl``) in step order.
        figures: the test figures of ``eval.json``, flat (``image_to_text/exact``), numbers only.
        samples: the run's samples.
    """

    name: str
    path: Path
    config: dict[str, Any]
    config_text: str
    metrics: dict[str, list[dict[str, Any]]]
    diagnostics: list[dict[str, Any]]
    figures: dict[str, float]
    samples: Samples

    def series(self, split: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one logged name, where logged."""
        entries = [e for e in self.metrics.get(split, []) if key in e]
        return [e["step"] for e in entries], [e[key] for e in entries]

    def names(self, split: str) -> list[str]:
        """Every name logged under ``split``, in first-logged order."""
        seen: dict[str, None] = {}
        for entry in self.metrics.get(split, []):
            seen.update(dict.fromkeys(k for k in entry if k not in ("step", "split", "time")))
        return list(seen)


def read_run(path: str | Path, name: str | None = None) -> RunData:
    """Read a run folder written by ``polymodal train``.

    Raises:
        ConfigError: ``path`` is not a run folder (it has no ``config.yaml``).
    """
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{path} is not a run folder: {config_path} is missing (train one with `polymodal train`)")
    config_text = config_path.read_text()
    config = yaml.safe_load(config_text) or {}
    metrics: dict[str, list[dict[str, Any]]] = {}
    for entry in read_jsonl(path / METRICS_FILE):
        metrics.setdefault(entry.get("split", "train"), []).append({k: _number(v) for k, v in entry.items()})
    for entries in metrics.values():
        entries.sort(key=lambda e: e["step"])
    diagnostics = sorted(read_jsonl(path / DIAGNOSTICS_FILE), key=lambda r: r["step"])
    return RunData(name or path.name, path, config, config_text, metrics, diagnostics, read_figures(path), read_samples(path))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file (none when it is missing); a torn last line is skipped."""
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (a run killed mid-write?); skipped", path, number)
    return entries


def read_figures(path: Path) -> dict[str, float]:
    """``eval.json``'s figures, flat and numeric (``{"image_to_text/exact": 0.9, ...}``)."""
    eval_path = path / EVAL_FILE
    if not eval_path.is_file():
        return {}
    figures = json.loads(eval_path.read_text()).get("figures", {})
    return {
        f"{section}/{key}": float(value)
        for section, values in figures.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def read_samples(path: Path) -> Samples:
    """The PNGs and WAVs under ``samples/``, and the first stage's reconstructions."""
    folder = path / SAMPLES_DIR
    images = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.png"))] if folder.is_dir() else []
    for candidate in (path / RECONSTRUCTIONS, path / IMAGE_TOKENIZER_DIR / RECONSTRUCTIONS):
        if candidate.is_file():
            images.append((f"image tokenizer reconstructions ({candidate.relative_to(path)})", candidate.read_bytes()))
    captions = {}
    if (folder / CAPTIONS).is_file():  # "text_to_audio_0.wav: forty two"
        for line in (folder / CAPTIONS).read_text().splitlines():
            file_name, _, caption = line.partition(": ")
            captions[file_name] = caption
    wavs = sorted(folder.glob("*.wav"), key=_natural) if folder.is_dir() else []
    audio = [(p.name, captions.get(p.name, ""), p.read_bytes()) for p in wavs[:MAX_AUDIO]]
    return Samples(images, audio)


def _natural(path: Path) -> tuple:
    """``x_2.wav`` before ``x_10.wav``."""
    stem, _, number = path.stem.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (path.stem, -1)


def _number(value: Any) -> Any:
    """metrics.jsonl writes non-finite floats as strings ("nan", "inf"); read them back as floats."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def finite(values: list[float]) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
