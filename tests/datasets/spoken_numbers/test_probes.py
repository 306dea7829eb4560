"""Probes that judge generated images and speech: digit-slot encoding round trip, decoding against a
brute-force reading, padding invariance of the audio probe, learning on real built-in data, and the
judges against ``probe_accuracy``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import ConcatDataset

from polymodal.config import DataConfig
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets.spoken_numbers import digit_slots, probe_training, probes
from polymodal.datasets.spoken_numbers.source import SpokenNumbersSource
from polymodal.modality import Modality

NUM_SAMPLES = 1000  # built-in data: 800 train, 100 val, 100 test; builds in ~4 s


def _one_hot_logits(numbers: torch.Tensor, max_digits: int) -> digit_slots.DigitSlotLogits:
    """Logits that put all the mass on the encoding of ``numbers`` (and uniform on ignored slots)."""
    lengths, digits = digit_slots.encode_digit_slots(numbers, max_digits=max_digits)
    length_logits = 10.0 * torch.nn.functional.one_hot(lengths, max_digits).float()
    digit_logits = 10.0 * torch.nn.functional.one_hot(digits.clamp(min=0), 10).float()
    digit_logits = digit_logits * (digits >= 0)[:, :, None]
    return digit_slots.DigitSlotLogits(length_logits, digit_logits)


def test_encoding_by_hand() -> None:
    lengths, digits = digit_slots.encode_digit_slots(torch.tensor([0, 7, 42, 105, 999]), max_digits=3)
    assert lengths.tolist() == [0, 0, 1, 2, 2]
    ignore = digit_slots.IGNORE_INDEX
    assert digits.tolist() == [[0, ignore, ignore], [7, ignore, ignore], [4, 2, ignore], [1, 0, 5], [9, 9, 9]]


@pytest.mark.parametrize("max_digits", [1, 2, 3])
def test_round_trip_every_number(max_digits: int) -> None:
    numbers = torch.arange(10**max_digits)
    lengths, digits = digit_slots.encode_digit_slots(numbers, max_digits=max_digits)
    # The encoding against the numeral's characters.
    for n, length, row in zip(numbers.tolist(), lengths.tolist(), digits.tolist()):
        text = str(n)
        assert length == len(text) - 1
        assert row == [int(c) for c in text] + [digit_slots.IGNORE_INDEX] * (max_digits - len(text))
    assert torch.equal(digit_slots.decode_digit_slots(_one_hot_logits(numbers, max_digits)), numbers)


def test_encoding_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="0..999"):
        digit_slots.encode_digit_slots(torch.tensor([1000]), max_digits=3)
    with pytest.raises(ValueError):
        digit_slots.encode_digit_slots(torch.tensor([-1]), max_digits=3)


def _read_by_hand(length_logits: list[float], digit_logits: list[list[float]]) -> int:
    """The greedy reading in plain Python: argmax length, argmax digit per slot, no leading 0."""
    length = max(range(len(length_logits)), key=lambda k: length_logits[k]) + 1
    digits = []
    for slot in range(length):
        choices = range(1, 10) if slot == 0 and length > 1 else range(10)
        digits.append(max(choices, key=lambda d: digit_logits[slot][d]))
    return int("".join(map(str, digits)))


def test_decoding_against_reading_by_hand() -> None:
    """Batched decoding (a masked argmax over every valid number) against reading slot by slot."""
    max_digits = 3
    gen = torch.Generator().manual_seed(0)
    logits = digit_slots.DigitSlotLogits(
        torch.randn(256, max_digits, generator=gen), torch.randn(256, max_digits, 10, generator=gen)
    )
    logits.digits[:64, 0, 0] = 10.0  # a leading 0 is the argmax of slot 0 for these
    decoded = digit_slots.decode_digit_slots(logits).tolist()
    expected = [_read_by_hand(logits.lengths[b].tolist(), logits.digits[b].tolist()) for b in range(256)]
    assert decoded == expected
    lengths = logits.lengths[:64].argmax(-1)
    assert (lengths > 0).any() and all(len(str(decoded[b])) == int(lengths[b]) + 1 for b in range(64))
    bf16 = digit_slots.DigitSlotLogits(logits.lengths.bfloat16(), logits.digits.bfloat16())
    assert digit_slots.decode_digit_slots(bf16).dtype == torch.long


def test_loss_ignores_padded_slots() -> None:
    numbers = torch.tensor([7, 42])
    logits = digit_slots.DigitSlotLogits(torch.randn(2, 3), torch.randn(2, 3, 10))
    changed = logits.digits.clone()
    changed[0, 1:] = 100 * torch.randn(2, 10)  # slots past 7's single digit
    changed[1, 2] = 100 * torch.randn(10)  # the slot past 42's two digits
    other = digit_slots.DigitSlotLogits(logits.lengths, changed)
    assert torch.equal(digit_slots.digit_slot_loss(logits, numbers), digit_slots.digit_slot_loss(other, numbers))
    assert digit_slots.digit_slot_loss(_one_hot_logits(numbers, 3), numbers) < 1e-3


def test_audio_probe_ignores_padding() -> None:
    """A clip scores the same alone and in a batch padded to a longer clip."""
    torch.manual_seed(0)
    probe = probes.AudioProbe(num_mels=16).eval()
    mels = torch.randn(2, 53, 16)
    mask = torch.arange(53)[None, :] < torch.tensor([[37], [53]])  # (2, F)
    mels = mels.masked_fill(~mask[:, :, None], 0.0)
    together = probe(mels, mask)
    alone = probe(mels[:1, :37], mask[:1, :37])
    torch.testing.assert_close(together.lengths[:1], alone.lengths, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.digits[:1], alone.digits, rtol=1e-5, atol=1e-5)


def test_image_probe_shapes_and_jitter_only_in_training() -> None:
    torch.manual_seed(0)
    probe = probes.ImageProbe(jitter=0.1)
    images = torch.rand(4, 1, 32, 96) * 2 - 1
    out = probe(images)
    assert out.lengths.shape == (4, 3) and out.digits.shape == (4, 3, 10)
    probe.eval()
    torch.testing.assert_close(probe(images).digits, probe(images).digits)  # deterministic when not training
    jittered = probe._jittered(images)
    assert not torch.allclose(jittered, images)
    assert jittered.shape == images.shape and jittered.min() >= -1 - 1e-5 and jittered.max() <= 1 + 1e-5


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Built-in data (train to learn from, val + test to score) and the collator."""
    config = DataConfig()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYMODAL_CACHE", str(tmp_path_factory.mktemp("cache")))
        data = SpokenNumbersSource(config, 0, num_samples=NUM_SAMPLES).load()
    collator = build_collator(TextTokenizer.train(data.train_texts, vocab_size=300), config)
    return data.train, ConcatDataset([data.val, data.test]), collator


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.AUDIO])
def test_probe_learns_and_judge_matches_accuracy(real, modality: Modality) -> None:
    """Brief training on 800 real items reads 200 held-out real items far above chance; the judge on
    the collated held-out items equals ``probe_accuracy`` batched differently."""
    train, test, collator = real
    fit = probe_training.fit_image_probe if modality == Modality.IMAGE else probe_training.fit_audio_probe
    steps = 250 if modality == Modality.IMAGE else 150
    probe, accuracy = fit(train, test, collator, steps=steps, batch_size=32, lr=5e-3, seed=0)
    assert probe_training.probe_accuracy(probe, train, collator, batch_size=64) > 0.5  # it fits its training items
    # Chance is 1/1000; always answering the commonest held-out number would score `constant`.
    labels = [test[i].label for i in range(len(test))]
    constant = max(labels.count(n) for n in labels) / len(labels)
    assert accuracy >= max(0.15, 3 * constant), (accuracy, constant)
    batch = collator([test[i] for i in range(len(test))])
    if modality == Modality.IMAGE:
        judged = probe_training.judge_images(probe, batch.inputs[Modality.IMAGE], batch.labels)
    else:
        judged = probe_training.judge_audio(probe, batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO], batch.labels)
    assert judged == pytest.approx(accuracy, abs=1e-12)
    assert probe_training.probe_accuracy(probe, test, collator, batch_size=7) == pytest.approx(accuracy, abs=1e-12)


def test_training_is_seeded(real) -> None:
    train, test, collator = real
    first, _ = probe_training.fit_audio_probe(train, test, collator, steps=5, batch_size=16, seed=3)
    second, _ = probe_training.fit_audio_probe(train, test, collator, steps=5, batch_size=16, seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_split_dataset_is_a_seeded_partition() -> None:
    kept, held = probe_training.split_dataset(list(range(50)), holdout_fraction=0.2, seed=1)
    assert len(held) == 10 and sorted(list(kept.indices) + list(held.indices)) == list(range(50))
    again, _ = probe_training.split_dataset(list(range(50)), holdout_fraction=0.2, seed=1)
    assert list(again.indices) == list(kept.indices)
