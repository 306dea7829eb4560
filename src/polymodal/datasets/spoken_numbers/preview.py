"""A look at the built-in data for ``polymodal data``: its statistics, and a preview (a PNG grid of
samples with their captions, number, split and voice, and a few WAVs named by number)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw, ImageFont

from polymodal.datasets.spoken_numbers.build import SPLIT_NAMES, SpokenNumbers

GRID_SAMPLES = 32
GRID_COLUMNS = 4
NUM_WAVS = 6
ZOOM = 2  # preview pixels per image pixel
CAPTION_LINES = 2  # caption, then number / split / voice
LINE_HEIGHT = 12  # pixels per caption line with Pillow's default bitmap font
CELL_PAD = 6
CAPTION_CHARS = 46  # the longest caption, "a picture of seven hundred and seventy seven", fits
CHAR_WIDTH = 5  # pixels per character of Pillow's default font (about 4.7)


def format_stats(data: SpokenNumbers) -> str:
    """The statistics as a small text table."""
    stats = data.stats()
    audio = stats["audio_seconds"]
    lengths = ", ".join(f"{d} digits: {n}" for d, n in stats["digit_lengths"].items())
    lines = [
        f"spoken numbers: {stats['samples']} samples, images {stats['image_shape'][0]}x{stats['image_shape'][1]}, "
        f"audio {stats['sample_rate']} Hz",
        f"digit lengths: {lengths}",
        f"held-out numbers (never in train): {stats['heldout_numbers']}",
        f"{'split':<6} {'samples':>8} {'held-out':>9} {'distinct':>9}   digit lengths",
    ]
    for name in SPLIT_NAMES:
        split = stats["splits"][name]
        hist = " ".join(f"{d}:{n}" for d, n in split["digit_lengths"].items())
        counts = f"{split['samples']:>8} {split['heldout_samples']:>9} {split['distinct_numbers']:>9}"
        lines.append(f"{name:<6} {counts}   {hist}")
    lines.append(
        f"audio seconds: mean {audio['mean']:.2f}, min {audio['min']:.2f}, max {audio['max']:.2f}, "
        f"total {audio['total'] / 3600:.2f} h"
    )
    return "\n".join(lines)


def preview_indices(data: SpokenNumbers, count: int) -> np.ndarray:
    """``count`` samples spread over the whole set (so every split shows), without repeats."""
    return np.unique(np.linspace(0, len(data) - 1, num=min(count, len(data))).round().astype(np.int64))


def preview_grid(data: SpokenNumbers, indices: np.ndarray) -> Image.Image:
    """A grid of images, each above its caption and a line with number, split and voice."""
    height, width = data.images.shape[1:]
    cell_w = max(width * ZOOM, CAPTION_CHARS * CHAR_WIDTH) + CELL_PAD
    cell_h = height * ZOOM + CAPTION_LINES * LINE_HEIGHT + CELL_PAD
    rows = -(-len(indices) // GRID_COLUMNS)
    sheet = Image.new("L", (GRID_COLUMNS * cell_w, rows * cell_h), color=255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    heldout = set(data.heldout_numbers.tolist())
    for slot, index in enumerate(indices):
        left, top = (slot % GRID_COLUMNS) * cell_w, (slot // GRID_COLUMNS) * cell_h
        image = Image.fromarray(data.images[index]).resize((width * ZOOM, height * ZOOM), Image.Resampling.NEAREST)
        sheet.paste(image, (left, top))
        number = int(data.labels[index])
        split = SPLIT_NAMES[data.splits[index]] + (" held-out" if number in heldout else "")
        tag = f"{number} {split} {data.voices[index]}"
        draw.text((left, top + height * ZOOM + 1), data.captions[index][:CAPTION_CHARS], fill=0, font=font)
        draw.text((left, top + height * ZOOM + 1 + LINE_HEIGHT), tag[:CAPTION_CHARS], fill=96, font=font)
    return sheet


def write_wavs(data: SpokenNumbers, indices: np.ndarray, out: Path) -> list[Path]:
    """One 16-bit WAV per sample, named ``<number>_<split>_<index>.wav``."""
    paths = []
    for index in indices:
        path = out / f"{int(data.labels[index])}_{SPLIT_NAMES[data.splits[index]]}_{int(index)}.wav"
        soundfile.write(path, data.speech(int(index)), data.sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths


def write_preview(data: SpokenNumbers, out: Path) -> list[Path]:
    """``samples.png`` (samples spread over every split) and a few of their WAVs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    picks = preview_indices(data, GRID_SAMPLES)
    grid_path = out / "samples.png"
    preview_grid(data, picks).save(grid_path)
    return [grid_path, *write_wavs(data, picks[:NUM_WAVS], out)]
