"""The built-in dataset "spoken handwritten numbers": per number an image, a caption and speech.

Each sample is a number of 1..max_digits digits (the digit count uniform, then the number uniform
among numbers of that length; no leading zeros, "0" is the only number starting with 0). Its image
is composed from real MNIST digits (LeCun et al. 1998, ``mnist.py``; ``drawing.py``): one MNIST image per digit,
cropped to its ink, scaled (MNIST fits each digit in a 20x20 box; that box becomes 60..90% of the
image height) and placed left to right with jittered gaps and heights, always whole and inside the
canvas. The caption comes from ``numbers.CAPTION_TEMPLATES`` (words or numerals). The speech is
espeak-ng (``speech.py``) reading the numeral with a random accent (each accent verbalises it its
own way: "one hundred and five" in British English, "one hundred five" in American), voice
variant, rate and pitch. A share of the training speech (``recorded_share``, default none) can be
recorded through a drawn talker, room, noise, channel, level and microphone (``recording.py``),
which makes a model read real recordings better; validation and test speech stay clean. A share
of the training speech (``flite_share``, default none) can be spoken by flite's voices instead
(``flite.py``; needs the system's flite): a second way of making speech, from other real talkers.

What the splits test:
- train/val/test (80/10/10) take their digit images from disjoint pools of the 5,000 MNIST images
  (split per class), so no val/test handwriting is seen in training;
- ``numbers.HELDOUT_FRACTION`` of the 2-, 3-, ... digit numbers (chosen by the seed) never occur in train;
  ``HELDOUT_SHARE`` of val and of test are those numbers (known digits, unseen combination).

Speed (the budget: 20,000 samples in at most 60 s on 2 cores from a cold cache). espeak-ng was
measured first: 1.5 ms of CPU per utterance of this data (mean 0.7 s of speech), synthesis plus
resampling, i.e. ~31 s of CPU for 20,000 utterances. That fits two cores, so every sample gets its
own utterance (its own voice draw): no waveform is shared between samples, hence none between
splits, and no prosody is lost to concatenated word units. Images cost 0.2 ms of CPU each (one
Pillow resize per digit). Speech and image chunks run in one fork pool. ``polymodal data`` (20,000
samples) measured 37 s of CPU, workers included: about 20 s on two idle cores. Independent random
streams spawned from the seed give byte-identical arrays, whatever the number of workers.

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
from torch.utils.data import Dataset

from polymodal.data import cache
from polymodal.data.batch import Sample
from polymodal.datasets.spoken_numbers import flite, speech
from polymodal.datasets.spoken_numbers.drawing import (
    BOX_HEIGHT_RANGE,
    GAP_RANGE,
    MARGIN,
    MIN_BOX,
    compose_chunk,
    draw_layouts,
)
from polymodal.datasets.spoken_numbers.mnist import load_mnist
from polymodal.datasets.spoken_numbers.numbers import MAX_NUMBER, choose_heldout, draw_numbers, make_caption

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump whenever the generated data would change: it keys the cache
CACHE_NAME = "spoken_numbers"
SPLIT_NAMES = ("train", "val", "test")  # split codes 0, 1, 2 in ``SpokenNumbers.splits``
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
HELDOUT_SHARE = 0.15  # of val and of test: samples whose number is held out
MAX_DIGITS_LIMIT = len(str(MAX_NUMBER))  # words exist up to 999,999
MIN_SAMPLES = 10  # so that every split gets at least one sample
IMAGE_CHUNK = 1024  # images per pool job
# Training speech recorded at build time: none by default, as built-in audio->text wants (alone 95.9%
# at 0, 86.8% at 0.7), though 0.7 reads real spoken digits at 58% instead of 19% (BENCHMARKS.md).
RECORDED_SHARE = 0.0


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
        voices: N espeak voice names ``"<accent>+<variant>"``, or ``"flite:<name> x<stretch> <pitch> Hz"``.
        rates: (N,) int16 words per minute (-1 for a flite voice).
        pitches: (N,) int16 on espeak's 0..100 scale (-1 for a flite voice).
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
    recorded_share: float = RECORDED_SHARE,
    flite_share: float = 0.0,
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
        recorded_share: the share of the training speech recorded through a drawn talker, room,
            noise, channel and microphone (``recording.py``); 0 keeps it as espeak says it.
        flite_share: the share of the training speech spoken by a drawn flite voice instead of an
            espeak-ng one (``flite.py``); validation and test speech stay espeak's.
        cache_dir: cache folder; None: ``$POLYMODAL_CACHE`` or ~/.cache/polymodal.
        use_cache: False builds afresh and neither reads nor writes the cache.
        num_workers: processes for speech synthesis; None: every available core. Does not change
            the data.

    Raises:
        ValueError: a parameter is out of range; the message says which and what would work.
    """
    _check_parameters(num_samples, max_digits, image_height, image_width, sample_rate, recorded_share, flite_share)
    params = {
        "num_samples": int(num_samples),
        "seed": int(seed),
        "max_digits": int(max_digits),
        "image_height": int(image_height),
        "image_width": int(image_width),
        "sample_rate": int(sample_rate),
        "recorded_share": float(recorded_share),
        "generator_version": GENERATOR_VERSION,
        "espeak_version": speech.espeak_version(),
        "synth_chunk": speech.SYNTH_CHUNK,
    }
    if flite_share > 0:  # absent at 0, so earlier builds stay valid
        params.update(flite_share=float(flite_share), flite_version=flite.flite_version())
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


def _check_parameters(
    num_samples: int, max_digits: int, image_height: int, image_width: int, sample_rate: int, recorded_share: float, flite_share: float
) -> None:
    if num_samples < MIN_SAMPLES:
        raise ValueError(f"num_samples must be at least {MIN_SAMPLES} (one per split), got {num_samples}")
    if not 1 <= max_digits <= MAX_DIGITS_LIMIT:
        raise ValueError(f"max_digits must be in 1..{MAX_DIGITS_LIMIT}, got {max_digits}")
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be at least 8000 Hz for intelligible speech, got {sample_rate}")
    for name, share in (("recorded_share", recorded_share), ("flite_share", flite_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {share}")
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
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(params["seed"]).spawn(9)]  # the first 8 as before the 9th
    rng_heldout, rng_numbers, rng_pools, rng_picks, rng_layout, rng_captions, rng_voices, rng_rooms, rng_flite = streams

    heldout = choose_heldout(rng_heldout, max_digits)
    labels_all, splits_all = _draw_labels(rng_numbers, heldout, num_samples, max_digits)

    _, mnist_labels = load_mnist()  # loaded before the fork, so workers inherit it
    sources = _pick_sources(rng_pools, rng_picks, labels_all, splits_all, mnist_labels, max_digits)
    layouts = draw_layouts(rng_layout, num_samples, max_digits)
    captions = [make_caption(int(n), rng_captions) for n in labels_all]
    voice_configs = [
        speech.random_voice(rng_voices, digits=len(str(int(n))), ranges=speech.TRAINING_VOICES if split == 0 else speech.EVALUATION_VOICES)
        for n, split in zip(labels_all, splits_all)
    ]
    noise_seeds = rng_voices.integers(0, 2**31 - 1, size=num_samples)
    # flite_share of the training speech takes a flite voice (flite.py) in place of its espeak one.
    flite_voices: list[flite.FliteVoice | None] = [None] * num_samples
    if params.get("flite_share", 0.0) > 0:
        spoken_by_flite = (splits_all == 0) & (rng_flite.random(num_samples) < params["flite_share"])
        for i in np.flatnonzero(spoken_by_flite).tolist():
            flite_voices[i] = flite.random_flite_voice(rng_flite, digits=len(str(int(labels_all[i]))))
    # recorded_share of the training speech is recorded (recording.py); the rest, validation and test stay clean.
    recorded = (splits_all == 0) & (rng_rooms.random(num_samples) < params["recorded_share"])
    recordings = np.where(recorded, rng_rooms.integers(0, 2**31 - 1, size=num_samples), -1)

    speech_jobs = speech.chunk_jobs(
        [str(int(n)) for n in labels_all], voice_configs, noise_seeds.tolist(), sample_rate=params["sample_rate"],
        recordings=recordings.tolist(), flite_voices=flite_voices,
    )  # fmt: skip
    image_jobs = [
        (sources[i : i + IMAGE_CHUNK], {k: v[i : i + IMAGE_CHUNK] for k, v in layouts.items()}, height, width)
        for i in range(0, num_samples, IMAGE_CHUNK)
    ]
    pool = speech.worker_pool(min(num_workers or speech.default_workers(), len(speech_jobs) + len(image_jobs)))
    if pool is None:
        audio, offsets = speech.join_chunks([speech.synth_chunk(job) for job in speech_jobs])
        images = np.concatenate([compose_chunk(job) for job in image_jobs])
    else:
        with pool:  # speech first: its chunks are the long ones, images fill the gaps
            speech_results = pool.map_async(speech.synth_chunk, speech_jobs, chunksize=1)
            image_results = pool.map_async(compose_chunk, image_jobs, chunksize=1)
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
        voices=[v.voice if f is None else f"flite:{f.name} x{f.stretch:.2f} {f.pitch:.0f} Hz" for v, f in zip(voice_configs, flite_voices)],
        rates=np.array([v.rate if f is None else -1 for v, f in zip(voice_configs, flite_voices)], dtype=np.int16),
        pitches=np.array([v.pitch if f is None else -1 for v, f in zip(voice_configs, flite_voices)], dtype=np.int16),
        sample_rate=params["sample_rate"],
    )


def _draw_labels(rng: np.random.Generator, heldout: np.ndarray, num_samples: int, max_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """Every item's number and split (0 train, 1 val, 2 test); held-out numbers only in val and test."""
    num_val = max(1, round(num_samples * VAL_FRACTION))
    num_test = max(1, round(num_samples * TEST_FRACTION))
    sizes = (num_samples - num_val - num_test, num_val, num_test)
    labels, splits = [], []
    for code, size in enumerate(sizes):
        forced = 0 if code == 0 or heldout.size == 0 else round(size * HELDOUT_SHARE)
        numbers = np.concatenate([rng.choice(heldout, size=forced), draw_numbers(rng, size - forced, max_digits, heldout)])
        labels.append(rng.permutation(numbers))
        splits.append(np.full(size, code, dtype=np.int8))
    return np.concatenate(labels).astype(np.int64), np.concatenate(splits)


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
