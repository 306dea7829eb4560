"""Reference speech for text -> audio: word durations from espeak's word events, shared among tokens,
and the collator's targets against the clip collated as ordinary audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.config import DataConfig
from polymodal.data.aligned_speech import build_reference_speech, token_durations
from polymodal.data.batch import Sample
from polymodal.data.collate import build_collator
from polymodal.data.numbers import make_caption
from polymodal.data.text import TextTokenizer
from polymodal.modality import Modality

HOP = 160


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    rng = np.random.default_rng(0)
    return TextTokenizer.train([make_caption(int(n), rng) for n in rng.integers(0, 1000, 3000)], vocab_size=400)


def test_durations_share_each_word_among_its_tokens_by_characters():
    text = "seventy seven"
    offsets = [(0, 5), (5, 7), (7, 13)]  # "seven" + "ty" + " seven": the space belongs to the next word
    durations = token_durations(text, offsets, np.array([160, 3360]), 4960, HOP)
    # Word 1: samples 160..3360 = 20 frames, 5 : 2 characters; word 2: 3360..4960 = 10 frames.
    # The leading 160 samples (1 frame) go to the first token.
    np.testing.assert_allclose(durations, [20 * 5 / 7 + 1, 20 * 2 / 7, 10])
    assert durations.sum() == pytest.approx(4960 / HOP)


def test_reference_clips_say_each_number_and_the_collator_aligns_them(tokenizer):
    config = DataConfig(num_mels=32)
    reference = build_reference_speech([42, 105, 7], sample_rate=config.sample_rate)
    assert reference[105].text == "one hundred and five" and len(reference[105].word_starts) == 4
    collator = build_collator(tokenizer, config, reference=reference)
    plain = build_collator(tokenizer, config)
    samples = [Sample(text="the number 42", label=42), Sample(text="9", label=9), Sample(text="105", label=105)]
    batch = collator(samples)
    speech = batch.speech
    assert speech.present.tolist() == [True, False, True]  # 9 has no reference clip: never trained on
    # The targets are the clips collated as ordinary speech, and the ids their words.
    alone = plain([Sample(text=reference[n].text, audio=torch.from_numpy(reference[n].waveform)) for n in (42, 105)])
    real = speech.present
    torch.testing.assert_close(speech.log_mels[real][:, : alone.inputs[Modality.AUDIO].shape[1]], alone.inputs[Modality.AUDIO])
    assert torch.equal(speech.ids[real][:, : alone.inputs[Modality.TEXT].shape[1]], alone.inputs[Modality.TEXT])
    # Durations: none on bos, eos and padding; in all, the clip's T / hop frames (it has 1 + T // hop).
    frames, total = speech.frame_mask.sum(1).float()[real], speech.durations.sum(1)[real]
    assert bool(((frames - 1 <= total) & (total < frames)).all())
    assert bool((speech.durations[:, 0] == 0).all()) and bool((speech.durations[~speech.mask] == 0).all())
    assert bool((speech.durations[speech.mask][1:] >= 0).all())
    # What generation reads for a caption: its number's words, as in training.
    ids, mask = collator.spoken_texts(["the number 42"])
    assert torch.equal(ids[0, : int(mask.sum())], speech.ids[0, : int(speech.mask[0].sum())])
