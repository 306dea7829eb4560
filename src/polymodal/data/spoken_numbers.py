"""The built-in dataset "spoken handwritten numbers": per number an image, a caption and speech.

Each sample is a number of 1..max_digits digits (the digit count uniform, then the number uniform
among numbers of that length; no leading zeros, "0" is the only number starting with 0). Its image
is composed from real MNIST digits (LeCun et al. 1998, ``mnist.py``): one MNIST image per digit,
cropped to its ink, scaled (MNIST fits each digit in a 20x20 box; that box becomes 60..90% of the
image height) and placed left to right with jittered gaps and heights, always whole and inside the
canvas. The caption comes from ``numbers.CAPTION_TEMPLATES`` (words or numerals). The speech is
espeak-ng (``speech.py``) reading the numeral with a random accent (each accent verbalises it its
own way: "one hundred and five" in British English, "one hundred five" in American), voice
variant, rate and pitch.

What the splits test:
- train/val/test (80/10/10) take their digit images from disjoint pools of the 5,000 MNIST images
  (split per class), so no val/test handwriting is seen in training;
- ``HELDOUT_FRACTION`` of the 2-, 3-, ... digit numbers (chosen by the seed) never occur in train;
  ``HELDOUT_SHARE`` of val and of test are those numbers (known digits, unseen combination).

Speed (the budget: 20,000 samples in at most 60 s on 2 cores from a cold cache). espeak-ng was
measured first: 1.5 ms of CPU per utterance of this data (mean 0.7 s of speech), synthesis plus
resampling, i.e. ~31 s of CPU for 20,000 utterances. That fits two cores, so every sample gets its
own utterance (its own voice draw): no waveform is shared between samples, hence none between
splits, and no prosody is lost to concatenated word units. Images cost 0.2 ms of CPU each (one
Pillow resize per digit). Speech and image chunks run in one fork pool. Measured for the whole
``polymodal data --num-samples 20000`` command: 37 s of CPU (user + system, workers included);
55 s of wall time on the 2 cores while other jobs kept the load average near 5, so about 20 s on
two idle cores. Everything random comes from independent streams spawned from the seed, so a
seed gives byte-identical arrays, whatever the number of workers.

Builds are cached (``cache.py``) under a hash of every build parameter, ``GENERATOR_VERSION``,
the espeak-ng version and the synthesis chunk size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from polymodal.data import cache, speech
from polymodal.data.batch import Sample
from polymodal.data.mnist import load_mnist
from polymodal.data.numbers import MAX_NUMBER, make_caption

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the generated data would change: it keys the cache
CACHE_NAME = "spoken_numbers"
SPLIT_NAMES = ("train", "val", "test")  # split codes 0, 1, 2 in ``SpokenNumbers.splits``
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
HELDOUT_FRACTION = 0.05  # of the numbers of each length >= 2
HELDOUT_SHARE = 0.15  # of val and of test: samples whose number is held out
MAX_DIGITS_LIMIT = len(str(MAX_NUMBER))  # words exist up to 999,999
MNIST_BOX = 20  # MNIST digits were size-normalised to fit a 20x20 box (LeCun et al. 1998)
BOX_HEIGHT_RANGE = (0.6, 0.9)  # that box's side as a fraction of the image height
GAP_RANGE = (0.02, 0.12)  # horizontal gap between digits, fraction of the image height
MARGIN = 1  # pixels kept clear on every side
MIN_BOX = 12  # pixels: below this, digits stop being legible
INK_LEVEL = 0  # a pixel above this is ink (for cropping)
MIN_SAMPLES = 10  # so that every split gets at least one sample
IMAGE_CHUNK = 1024  # images per pool job


@dataclasses.dataclass(frozen=True)
class SpokenNumbers:
    """The whole built dataset as arrays; ``split(name)`` gives a torch Dataset over one split.

    Attributes:
        images: (N, H, W) uint8, white digits on black.
        labels: (N,) int64, the number.
        captions: N captions.
        audio: (sum T_i,) int16, every utterance one after another.
        audio_offsets: (N + 1,) int64; sample i's speech is ``audio[audio_offsets[i]:audio_offsets[i + 1]]``.
        splits: (N,) int8: 0 train, 1 val, 2 test.
        heldout_numbers: (K,) int64 sorted, the numbers never in train.
        digit_sources: (N, max_digits) int32, the MNIST index of each digit image, left to right;
            -1 pads shorter numbers.
        voices: N espeak voice names ``"<accent>+<variant>"``.
        rates: (N,) int16 words per minute.
        pitches: (N,) int16 on espeak's 0..100 scale.
        sample_rate: audio samples per second.
    """

    images: np.ndarray
    labels: np.ndarray
    captions: list[str]
    audio: np.ndarray
    audio_offsets: np.ndarray
    splits: np.ndarray
    heldout_numbers: np.ndarray
    digit_sources: np.ndarray
    voices: list[str]
    rates: np.ndarray
    pitches: np.ndarray
    sample_rate: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def speech(self, index: int) -> np.ndarray:
        """(T,) int16 speech of sample ``index`` (a view)."""
        return self.audio[self.audio_offsets[index] : self.audio_offsets[index + 1]]

    def split_indices(self, name: str) -> np.ndarray:
        """(n,) int64 indices of the samples in split ``name`` (train | val | test), ascending."""
        return np.flatnonzero(self.splits == _split_code(name))

    def split(self, name: str) -> "SpokenNumbersSplit":
        """A torch Dataset of ``Sample``s over split ``name`` (train | val | test)."""
        return SpokenNumbersSplit(self, self.split_indices(name))

    def stats(self) -> dict[str, Any]:
        """Counts per split (samples, held-out samples, distinct numbers, digit lengths) and audio seconds."""
        lengths = np.array([len(str(n)) for n in self.labels])
        heldout = np.isin(self.labels, self.heldout_numbers)
        seconds = np.diff(self.audio_offsets) / self.sample_rate
        per_split = {}
        for code, name in enumerate(SPLIT_NAMES):
            mask = self.splits == code
            per_split[name] = {
                "samples": int(mask.sum()),
                "heldout_samples": int((mask & heldout).sum()),
                "distinct_numbers": int(np.unique(self.labels[mask]).size),
                "digit_lengths": {int(d): int((mask & (lengths == d)).sum()) for d in np.unique(lengths)},
            }
        return {
            "samples": len(self),
            "heldout_numbers": int(self.heldout_numbers.size),
            "splits": per_split,
            "digit_lengths": {int(d): int((lengths == d).sum()) for d in np.unique(lengths)},
            "audio_seconds": {
                "mean": float(seconds.mean()),
                "min": float(seconds.min()),
                "max": float(seconds.max()),
                "total": float(seconds.sum()),
            },
            "image_shape": list(self.images.shape[1:]),
            "sample_rate": self.sample_rate,
        }


class SpokenNumbersSplit(Dataset):
    """One split as ``Sample``s: image (1, H, W) float32 in [0, 1], caption, audio (T,) float32, label."""

    def __init__(self, data: SpokenNumbers, indices: np.ndarray) -> None:
        self.data = data
        self.indices = indices

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, i: int) -> Sample:
        index = int(self.indices[i])
        image = torch.from_numpy(self.data.images[index]).float().div_(255.0).unsqueeze(0)  # (H, W) -> (1, H, W)
        audio = torch.from_numpy(self.data.speech(index).astype(np.float32) / speech.INT16_SCALE)  # (T,)
        return Sample(image=image, text=self.data.captions[index], audio=audio, label=int(self.data.labels[index]))


def _split_code(name: str) -> int:
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLIT_NAMES)}")
    return SPLIT_NAMES.index(name)


# ----------------------------------------------------------------------------- building


def build_spoken_numbers(
    *,
    num_samples: int,
    seed: int,
    max_digits: int = 3,
    image_height: int = 32,
    image_width: int = 96,
    sample_rate: int = 16000,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    num_workers: int | None = None,
) -> SpokenNumbers:
    """Build the dataset, or load it from the cache when built before with the same parameters.

    Args:
        num_samples: samples over all splits (80% train, 10% val, 10% test).
        seed: every random choice follows from it.
        max_digits: numbers have 1..max_digits digits (at most 6).
        image_height: canvas height in pixels.
        image_width: canvas width in pixels; must fit max_digits legible digits.
        sample_rate: audio rate in Hz.
        cache_dir: cache folder; None: ``$POLYMODAL_CACHE`` or ~/.cache/polymodal.
        use_cache: False builds afresh and neither reads nor writes the cache.
        num_workers: processes for speech synthesis; None: every available core. Does not change
            the data.

    Raises:
        ValueError: a parameter is out of range; the message says which and what would work.
    """
    _check_parameters(num_samples, max_digits, image_height, image_width, sample_rate)
    params = {
        "num_samples": int(num_samples),
        "seed": int(seed),
        "max_digits": int(max_digits),
        "image_height": int(image_height),
        "image_width": int(image_width),
        "sample_rate": int(sample_rate),
        "generator_version": GENERATOR_VERSION,
        "espeak_version": speech.espeak_version(),
        "synth_chunk": speech.SYNTH_CHUNK,
    }
    path = cache.cache_path(CACHE_NAME, params, cache_dir=cache_dir)
    if use_cache:
        entry = cache.load_entry(path)
        if entry is not None:
            logger.info("loaded spoken numbers from %s", path)
            return _from_entry(*entry)
    start = time.perf_counter()
    data = _generate(params, num_workers=num_workers)
    logger.info("built %d spoken numbers in %.1f s", num_samples, time.perf_counter() - start)
    if use_cache:
        cache.save_entry(path, *_to_entry(data))
    return data


def _check_parameters(num_samples: int, max_digits: int, image_height: int, image_width: int, sample_rate: int) -> None:
    if num_samples < MIN_SAMPLES:
        raise ValueError(f"num_samples must be at least {MIN_SAMPLES} (one per split), got {num_samples}")
    if not 1 <= max_digits <= MAX_DIGITS_LIMIT:
        raise ValueError(f"max_digits must be in 1..{MAX_DIGITS_LIMIT}, got {max_digits}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz for intelligible speech, got {sample_rate}")
    if image_height < MIN_BOX + 2 * MARGIN:
        raise ValueError(f"image_height must be at least {MIN_BOX + 2 * MARGIN} pixels, got {image_height}")
    # Worst case: every digit as wide as its box at the largest size, widest gaps; the layout then
    # shrinks all digits uniformly, and the smallest one must stay legible.
    widest = max_digits * BOX_HEIGHT_RANGE[1] * image_height + (max_digits - 1) * GAP_RANGE[1] * image_height
    room = image_width - 2 * MARGIN
    smallest = BOX_HEIGHT_RANGE[0] * image_height * min(1.0, room / widest)
    if smallest < MIN_BOX:
        needed = int(np.ceil(2 * MARGIN + widest * MIN_BOX / (BOX_HEIGHT_RANGE[0] * image_height)))
        raise ValueError(
            f"image_width {image_width} is too narrow for {max_digits} legible digits at height "
            f"{image_height}; use image_width >= {needed} or fewer max_digits"
        )


def _generate(params: dict[str, Any], *, num_workers: int | None) -> SpokenNumbers:
    num_samples, max_digits = params["num_samples"], params["max_digits"]
    height, width = params["image_height"], params["image_width"]
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(params["seed"]).spawn(7)]
    rng_heldout, rng_numbers, rng_pools, rng_picks, rng_layout, rng_captions, rng_voices = streams

    heldout = _choose_heldout(rng_heldout, max_digits)
    num_val = max(1, round(num_samples * VAL_FRACTION))
    num_test = max(1, round(num_samples * TEST_FRACTION))
    sizes = (num_samples - num_val - num_test, num_val, num_test)
    labels, splits = [], []
    for code, size in enumerate(sizes):
        forced = 0 if code == 0 or heldout.size == 0 else round(size * HELDOUT_SHARE)
        numbers = np.concatenate(
            [rng_numbers.choice(heldout, size=forced), _draw_numbers(rng_numbers, size - forced, max_digits, heldout)]
        )
        labels.append(rng_numbers.permutation(numbers))
        splits.append(np.full(size, code, dtype=np.int8))
    labels_all = np.concatenate(labels).astype(np.int64)
    splits_all = np.concatenate(splits)

    _, mnist_labels = load_mnist()  # loaded before the fork, so workers inherit it
    sources = _pick_sources(rng_pools, rng_picks, labels_all, splits_all, mnist_labels, max_digits)
    layouts = _draw_layouts(rng_layout, num_samples, max_digits)
    captions = [make_caption(int(n), rng_captions) for n in labels_all]
    voice_configs = [speech.random_voice(rng_voices) for _ in range(num_samples)]
    noise_seeds = rng_voices.integers(0, 2**31 - 1, size=num_samples)

    speech_jobs = speech.chunk_jobs(
        [str(int(n)) for n in labels_all], voice_configs, noise_seeds.tolist(), sample_rate=params["sample_rate"]
    )
    image_jobs = [
        (sources[i : i + IMAGE_CHUNK], {k: v[i : i + IMAGE_CHUNK] for k, v in layouts.items()}, height, width)
        for i in range(0, num_samples, IMAGE_CHUNK)
    ]
    pool = speech.worker_pool(min(num_workers or speech.default_workers(), len(speech_jobs) + len(image_jobs)))
    if pool is None:
        audio, offsets = speech.join_chunks([speech.synth_chunk(job) for job in speech_jobs])
        images = np.concatenate([_compose_chunk(job) for job in image_jobs])
    else:
        with pool:  # speech first: its chunks are the long ones, images fill the gaps
            speech_results = pool.map_async(speech.synth_chunk, speech_jobs, chunksize=1)
            image_results = pool.map_async(_compose_chunk, image_jobs, chunksize=1)
            audio, offsets = speech.join_chunks(speech_results.get())
            images = np.concatenate(image_results.get())
    return SpokenNumbers(
        images=images,
        labels=labels_all,
        captions=captions,
        audio=audio,
        audio_offsets=offsets,
        splits=splits_all,
        heldout_numbers=heldout,
        digit_sources=sources,
        voices=[v.voice for v in voice_configs],
        rates=np.array([v.rate for v in voice_configs], dtype=np.int16),
        pitches=np.array([v.pitch for v in voice_configs], dtype=np.int16),
        sample_rate=params["sample_rate"],
    )


def _length_range(length: int) -> tuple[int, int]:
    """[low, high) of the numbers with ``length`` digits: 1 -> [0, 10), 2 -> [10, 100), ..."""
    return (0 if length == 1 else 10 ** (length - 1)), 10**length


def _choose_heldout(rng: np.random.Generator, max_digits: int) -> np.ndarray:
    """(K,) int64 sorted: HELDOUT_FRACTION of the numbers of each length 2..max_digits."""
    chosen = []
    for length in range(2, max_digits + 1):
        low, high = _length_range(length)
        count = max(1, round(HELDOUT_FRACTION * (high - low)))
        chosen.append(low + rng.choice(high - low, size=count, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def _draw_numbers(rng: np.random.Generator, count: int, max_digits: int, excluded: np.ndarray) -> np.ndarray:
    """(count,) int64: digit count uniform in 1..max_digits, then a number of that length uniform
    over those not ``excluded`` (redrawn at the same length, so the length stays uniform)."""
    lengths = rng.integers(1, max_digits + 1, size=count)
    numbers = np.zeros(count, dtype=np.int64)
    todo = np.arange(count)
    while todo.size:
        bounds = np.array([_length_range(int(d)) for d in lengths[todo]]).reshape(-1, 2)  # (n, 2) low, high
        numbers[todo] = bounds[:, 0] + (rng.random(todo.size) * (bounds[:, 1] - bounds[:, 0])).astype(np.int64)
        todo = todo[np.isin(numbers[todo], excluded)]
    return numbers


def _pick_sources(
    rng_pools: np.random.Generator,
    rng_picks: np.random.Generator,
    labels: np.ndarray,
    splits: np.ndarray,
    mnist_labels: np.ndarray,
    max_digits: int,
) -> np.ndarray:
    """(N, max_digits) int32 MNIST indices, one per digit; each split draws from its own pool.

    The pools split each class's MNIST images 80/10/10 (train/val/test), so pools are disjoint.
    """
    digits = np.full((labels.size, max_digits), -1, dtype=np.int64)  # (N, max_digits), -1 past the end
    for i, n in enumerate(labels):
        text = str(int(n))
        digits[i, : len(text)] = [ord(c) - ord("0") for c in text]
    sources = np.full(digits.shape, -1, dtype=np.int32)
    for cls in range(10):
        members = rng_pools.permutation(np.flatnonzero(mnist_labels == cls))
        num_val = round(members.size * VAL_FRACTION)
        num_test = round(members.size * TEST_FRACTION)
        val_start, test_start = members.size - num_val - num_test, members.size - num_test
        pools = (members[:val_start], members[val_start:test_start], members[test_start:])
        for code, pool in enumerate(pools):
            rows, cols = np.nonzero((digits == cls) & (splits[:, None] == code))
            sources[rows, cols] = pool[rng_picks.integers(0, pool.size, size=rows.size)]
    return sources


def _crop_to_ink(image: np.ndarray) -> np.ndarray:
    """(28, 28) -> (h, w) the bounding box of the ink."""
    rows = np.flatnonzero((image > INK_LEVEL).any(axis=1))
    cols = np.flatnonzero((image > INK_LEVEL).any(axis=0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _draw_layouts(rng: np.random.Generator, count: int, max_digits: int) -> dict[str, np.ndarray]:
    """Every random number of the image layout, drawn at once (the layout itself is arithmetic).

    Returns:
        boxes: (count, max_digits) side of each digit's 20x20 MNIST box, fraction of the height.
        gaps: (count, max_digits) gap after each digit, fraction of the height (last one unused).
        x: (count,) where the row of digits starts within the free width, 0..1.
        y: (count, max_digits) where each digit sits within the free height, 0..1.
    """
    return {
        "boxes": rng.uniform(*BOX_HEIGHT_RANGE, size=(count, max_digits)),
        "gaps": rng.uniform(*GAP_RANGE, size=(count, max_digits)),
        "x": rng.random(count),
        "y": rng.random((count, max_digits)),
    }


def _compose_chunk(job: tuple[np.ndarray, dict[str, np.ndarray], int, int]) -> np.ndarray:
    """Draw one chunk of images; runs in a pool worker.

    Args:
        job: sources (n, max_digits) MNIST indices (-1 padding), layouts from ``_draw_layouts``
            (n rows), image height, image width.

    Returns:
        (n, H, W) uint8, the digits left to right, each whole and inside the canvas.
    """
    sources, layout, height, width = job
    mnist_images, _ = load_mnist()
    images = np.zeros((sources.shape[0], height, width), dtype=np.uint8)
    for i, row in enumerate(sources):
        glyphs = [_crop_to_ink(mnist_images[index]) for index in row[row >= 0]]
        _draw_digits(images[i], glyphs, {k: v[i] for k, v in layout.items()})
    return images


def _draw_digits(canvas: np.ndarray, glyphs: list[np.ndarray], layout: dict[str, np.ndarray]) -> np.ndarray:
    """Draw ink-cropped ``glyphs`` left to right into ``canvas`` (H, W) uint8, in place.

    Args:
        layout: one row of ``_draw_layouts`` (boxes, gaps, y per digit; x).

    Returns:
        (len(glyphs), 2) int64: each digit's first column and width in pixels.
    """
    height, width = canvas.shape
    room = width - 2 * MARGIN
    count = len(glyphs)
    boxes = layout["boxes"][:count] * height  # px
    gaps = layout["gaps"][: count - 1] * height  # px
    glyph_h = np.array([g.shape[0] for g in glyphs]) * boxes / MNIST_BOX
    glyph_w = np.array([g.shape[1] for g in glyphs]) * boxes / MNIST_BOX
    shrink = min(1.0, room / (glyph_w.sum() + gaps.sum()))  # too wide: shrink all alike
    glyph_h = np.clip(np.floor(glyph_h * shrink), 1, height - 2 * MARGIN).astype(int)
    glyph_w = np.clip(np.floor(glyph_w * shrink), 1, room).astype(int)
    gaps_px = np.floor(gaps * shrink).astype(int)
    free_x = room - glyph_w.sum() - gaps_px.sum()
    x = MARGIN + int(layout["x"] * (free_x + 1))
    spans = np.zeros((count, 2), dtype=np.int64)
    for k, glyph in enumerate(glyphs):
        y = MARGIN + int(layout["y"][k] * (height - 2 * MARGIN - glyph_h[k] + 1))
        scaled = np.asarray(Image.fromarray(glyph).resize((int(glyph_w[k]), int(glyph_h[k])), Image.Resampling.BILINEAR))
        region = canvas[y : y + glyph_h[k], x : x + glyph_w[k]]
        np.maximum(region, scaled, out=region)  # overlapping strokes stay white, none erased
        spans[k] = x, glyph_w[k]
        x += glyph_w[k] + (gaps_px[k] if k < count - 1 else 0)
    return spans


# The reference handwriting of text -> image: every layout draw at the middle of its range, so a
# number's digits sit centred, at 0.75 of the height, 0.07 of the height apart.
REFERENCE_LAYOUT = {"boxes": 0.75, "gaps": 0.07, "x": 0.5, "y": 0.5}


def reference_glyphs(data: SpokenNumbers) -> np.ndarray:
    """(10, 28, 28) uint8: per digit, the training split's most typical MNIST image (nearest, in
    pixels, to the mean of that digit's training images): the glyphs of ``draw_reference``."""
    mnist_images, mnist_labels = load_mnist()
    pool = np.unique(data.digit_sources[data.splits == _split_code("train")])
    pool = pool[pool >= 0]
    glyphs = np.zeros((10, *mnist_images.shape[1:]), dtype=np.uint8)
    for digit in range(10):
        members = pool[mnist_labels[pool] == digit]
        if members.size == 0:
            raise ValueError(f"the training split draws no image of the digit {digit}; build more samples")
        pixels = mnist_images[members].reshape(members.size, -1).astype(np.float64)
        glyphs[digit] = mnist_images[members[np.argmin(((pixels - pixels.mean(0)) ** 2).sum(1))]]
    return glyphs


def draw_reference(number: int, glyphs: np.ndarray, *, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``number`` in the reference handwriting: ``glyphs`` (from ``reference_glyphs``) placed by
    ``REFERENCE_LAYOUT``.

    Returns:
        (H, W) uint8 image, and (D, 2) int64 first column and width of each of its D digits.
    """
    digits = [int(c) for c in str(int(number))]
    layout = {k: np.full(len(digits), v) if k != "x" else v for k, v in REFERENCE_LAYOUT.items()}
    canvas = np.zeros((height, width), dtype=np.uint8)
    spans = _draw_digits(canvas, [_crop_to_ink(glyphs[d]) for d in digits], layout)
    return canvas, spans


# ----------------------------------------------------------------------------- cache entries

_ARRAY_FIELDS = (
    "images", "labels", "audio", "audio_offsets", "splits", "heldout_numbers", "digit_sources", "rates", "pitches",
)  # fmt: skip
_VALUE_FIELDS = ("captions", "voices", "sample_rate")


def _to_entry(data: SpokenNumbers) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays = {name: getattr(data, name) for name in _ARRAY_FIELDS}
    values = {name: getattr(data, name) for name in _VALUE_FIELDS}
    return arrays, values


def _from_entry(arrays: dict[str, np.ndarray], values: dict[str, Any]) -> SpokenNumbers:
    fields = {name: arrays[name] for name in _ARRAY_FIELDS}
    fields.update({name: values[name] for name in _VALUE_FIELDS})
    return SpokenNumbers(**fields)
