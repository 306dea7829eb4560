"""References for text -> audio and text -> image: spans from espeak's word events and from the
image composer, shared among tokens; the collator's targets against the same renderings collated
as ordinary samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.config import DataConfig
from polymodal.data.batch import Sample
from polymodal.data.collate import build_collator
from polymodal.data.references import Reference, token_durations
from polymodal.data.text import TextTokenizer
from polymodal.datasets.spoken_numbers.build import build_spoken_numbers
from polymodal.datasets.spoken_numbers.drawing import draw_reference
from polymodal.datasets.spoken_numbers.numbers import make_caption
from polymodal.datasets.spoken_numbers.references import reference_glyphs, reference_images, reference_speech
from polymodal.datasets.spoken_numbers.source import SpokenNumbersSource
from polymodal.modality import Modality

HOP = 160


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    rng = np.random.default_rng(0)
    return TextTokenizer.train([make_caption(int(n), rng) for n in rng.integers(0, 1000, 3000)], vocab_size=400)


@pytest.fixture(scope="module")
def glyphs() -> np.ndarray:
    return reference_glyphs(build_spoken_numbers(num_samples=400, seed=0, use_cache=False))


def test_durations_share_each_unit_among_its_tokens_by_characters():
    reference = Reference("seventy seven", np.zeros(5000), [(0, 7), (8, 13)], np.array([160, 3360, 4960]), 5000)
    offsets = [(0, 5), (5, 7), (7, 13)]  # "seven" + "ty" + " seven": the space belongs to the next word
    lead, durations, trail = token_durations(reference, offsets, HOP)
    # Word 1: samples 160..3360 = 20 frames, 5 : 2 characters; word 2: 3360..4960 = 10 frames.
    np.testing.assert_allclose(durations, [20 * 5 / 7, 20 * 2 / 7, 10])
    assert (lead, trail) == (1.0, 0.25)  # before the first word, after the last
    assert lead + durations.sum() + trail == pytest.approx(5000 / HOP)


def test_the_reference_handwriting_is_the_typical_training_digit_centred(glyphs):
    image, spans = draw_reference(408, glyphs, height=32, width=96)
    assert image.shape == (32, 96) and spans.shape == (3, 2)
    assert (np.diff(spans[:, 0]) > spans[:-1, 1]).all()  # left to right, with gaps
    left, right = spans[0, 0], 96 - spans[-1, 0] - spans[-1, 1]
    assert abs(left - right) <= 1  # centred
    ink = np.flatnonzero(image.max(0) > 0)
    assert ink[0] >= spans[0, 0] and ink[-1] < spans[-1, 0] + spans[-1, 1]  # the spans hold the ink


def test_speech_references_collate_as_aligned_targets(tokenizer):
    config = DataConfig(num_mels=32)
    references = reference_speech([42, 105, 7], sample_rate=config.sample_rate)
    assert references[105].text == "one hundred and five" and len(references[105].units) == 4
    front_end = SpokenNumbersSource(config, 0).source_text  # what a speaker says for a text
    collator = build_collator(tokenizer, config, references={Modality.AUDIO: references}, front_end=front_end)
    plain = build_collator(tokenizer, config)
    samples = [Sample(text="the number 42", label=42), Sample(text="9", label=9), Sample(text="105", label=105)]
    speech = collator(samples).references[Modality.AUDIO]
    assert speech.present.tolist() == [True, False, True]  # 9 has no reference: never trained on
    # The targets are the clips collated as ordinary speech, each followed by zeros (a longer clip
    # in the batch), and the ids their words; worked out once per number, the same every batch.
    clips = [torch.from_numpy(references[n].value) for n in (42, 105)]
    longer = torch.zeros(max(c.shape[0] for c in clips) + config.n_fft)
    alone = plain([*(Sample(text=references[n].text, audio=c) for n, c in zip((42, 105), clips)), Sample(audio=longer)])
    real = speech.present
    width = speech.values.shape[1]
    torch.testing.assert_close(speech.values[real], alone.inputs[Modality.AUDIO][:2, :width])
    torch.testing.assert_close(speech.value_mask[real], alone.masks[Modality.AUDIO][:2, :width])
    assert torch.equal(speech.ids[real][:, : alone.inputs[Modality.TEXT].shape[1]], alone.inputs[Modality.TEXT][:2])
    again = collator(samples[::-1]).references[Modality.AUDIO]
    torch.testing.assert_close(again.values.flip(0), speech.values, rtol=0, atol=0)
    # Durations: none on padding; in all, the clip's T / hop frames (it has 1 + T // hop).
    frames, total = speech.value_mask.sum(1).float()[real], speech.durations.sum(1)[real]
    assert bool(((frames - 1 <= total) & (total < frames)).all())
    assert bool((speech.durations[~speech.mask] == 0).all()) and bool((speech.durations >= 0).all())
    # What generation reads for a caption: its number's words, as in training.
    ids, mask = collator.source_texts(Modality.AUDIO, ["the number 42"])
    assert torch.equal(ids[0, : int(mask.sum())], speech.ids[0, : int(speech.mask[0].sum())])


def test_image_references_collate_as_aligned_targets(tokenizer, glyphs):
    config = DataConfig()
    references = reference_images([42, 7], glyphs, height=32, width=96)
    front_end = SpokenNumbersSource(config, 0).source_text  # what a writer writes for a text
    collator = build_collator(tokenizer, config, references={Modality.IMAGE: references}, front_end=front_end)
    drawing = collator([Sample(text="forty two", label=42), Sample(text="9", label=9)]).references[Modality.IMAGE]
    assert drawing.present.tolist() == [True, False]
    picture = torch.from_numpy(references[42].value)[None].float() / 255.0
    expected = collator([Sample(image=picture, text="42")])
    torch.testing.assert_close(drawing.values[:1], expected.inputs[Modality.IMAGE])
    assert torch.equal(drawing.ids[:1, :4], expected.inputs[Modality.TEXT])  # bos 4 2 eos
    # bos: the left margin; each digit: its glyph and the gap after it; eos: the right margin.
    _, spans = draw_reference(42, glyphs, height=32, width=96)
    first, second = spans.tolist()
    assert drawing.durations[0, :4].tolist() == [first[0], second[0] - first[0], second[1], 96 - second[0] - second[1]]
    ids, mask = collator.source_texts(Modality.IMAGE, ["a picture of forty two"])
    assert torch.equal(ids, drawing.ids[:1, :4])
