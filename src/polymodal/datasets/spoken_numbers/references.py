"""The built-in data's references: what text -> audio and text -> image learn from, aligned word by
word and digit by digit (``polymodal.data.references`` turns them into token durations).

The built-in data gives every sample its own accent, voice, rate and pitch, and its own handwriting
and layout. A decoder that predicts frames or VQ codes from text cannot represent that spread: it
learns its average, a blur (measured: the speech judge read 10.6% of such speech and the image
judge 2-4% of such images, BENCHMARKS.md). So the two generation tasks learn ONE rendering of each
training number, as a single-speaker TTS corpus has one voice:

* speech: espeak-ng's default English voice at its default rate and pitch reading the number's
  words (``numbers.spoken_words``); espeak reports where each word starts (its word events,
  ``speech.synthesize_words``);
* images: the number's digits (``numbers.written_digits``) drawn by the data's own composer with
  the training split's most typical image of each digit, every layout draw at the middle of its
  range (``drawing.draw_reference``); the composer reports each digit's columns.

Each unit (a word, a digit) covers a span of the target, which gives every source token a duration:
the targets of a FastSpeech-style duration predictor and length regulator (Ren et al. 2019,
arXiv:1905.09263). Without durations, the frame queries must find out themselves which word they
fall in; measured with one voice and no durations, the judge read 19.4% of the numbers seen in
training and 1.5% of held-out ones (BENCHMARKS.md).

Speed: the 1,000 numbers of the default data take about half a second of speech synthesis and a
tenth of a second of drawing; references are made when a run is prepared, not cached.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from polymodal.data.references import Reference
from polymodal.datasets.spoken_numbers import speech
from polymodal.datasets.spoken_numbers.build import SPLIT_NAMES, SpokenNumbers
from polymodal.datasets.spoken_numbers.drawing import draw_reference
from polymodal.datasets.spoken_numbers.mnist import load_mnist
from polymodal.datasets.spoken_numbers.numbers import number_to_words

REFERENCE_VOICE = speech.VoiceConfig()  # espeak's "en", rate 175 wpm, pitch 50
REFERENCE_SEED = 0  # espeak's noise seed (the default voice has no noise; fixed all the same)


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans, at = [], 0
    for word in text.split(" "):
        spans.append((at, at + len(word)))
        at += len(word) + 1
    return spans


def reference_speech(numbers: Iterable[int], *, sample_rate: int) -> dict[int, Reference]:
    """Each number's words in the reference voice; units are words, bounds in samples.

    Raises:
        RuntimeError: espeak did not report one start per word (a change of espeak-ng's word rules).
    """
    numbers = sorted({int(n) for n in numbers})
    texts = [number_to_words(n) for n in numbers]
    spoken = speech.synthesize_words(texts, voice=REFERENCE_VOICE, sample_rate=sample_rate, seed=REFERENCE_SEED)
    out = {}
    for n, text, (wave, starts) in zip(numbers, texts, spoken):
        units = _word_spans(text)
        if len(starts) != len(units):
            raise RuntimeError(f"espeak-ng reported {len(starts)} word starts for the {len(units)} words of {text!r}")
        out[n] = Reference(text, wave, units, np.append(starts, len(wave)), len(wave))
    return out


def reference_images(numbers: Iterable[int], glyphs: np.ndarray, *, height: int, width: int) -> dict[int, Reference]:
    """Each number's digits in the reference handwriting; units are digits, bounds in columns.

    Args:
        glyphs: (10, 28, 28) uint8 from ``reference_glyphs``.
    """
    out = {}
    for n in sorted({int(n) for n in numbers}):
        text = str(n)
        image, spans = draw_reference(n, glyphs, height=height, width=width)
        bounds = np.append(spans[:, 0], spans[-1, 0] + spans[-1, 1])
        out[n] = Reference(text, image, [(i, i + 1) for i in range(len(text))], bounds, width)
    return out


def reference_glyphs(data: SpokenNumbers) -> np.ndarray:
    """(10, 28, 28) uint8: per digit, the training split's most typical MNIST image (nearest, in
    pixels, to the mean of that digit's training images): the glyphs of ``draw_reference``."""
    mnist_images, mnist_labels = load_mnist()
    pool = np.unique(data.digit_sources[data.splits == SPLIT_NAMES.index("train")])
    pool = pool[pool >= 0]
    glyphs = np.zeros((10, *mnist_images.shape[1:]), dtype=np.uint8)
    for digit in range(10):
        members = pool[mnist_labels[pool] == digit]
        if members.size == 0:
            raise ValueError(f"the training split draws no image of the digit {digit}; build more samples")
        pixels = mnist_images[members].reshape(members.size, -1).astype(np.float64)
        glyphs[digit] = mnist_images[members[np.argmin(((pixels - pixels.mean(0)) ** 2).sum(1))]]
    return glyphs
