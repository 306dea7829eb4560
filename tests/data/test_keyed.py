"""Training items and their keys: the sampler hands out (epoch, index) keys; an item's augmentation
is a function of its key alone (same key, same sample; any loading order); SpecAugment in the
collator masks keyed (training) items only, each as ``spec_augment`` on it alone would; a waveform
encoder gets (B, T) samples with a mask; noise clips come from a manifest."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import soundfile
import torch
from torch.utils.data import Dataset

from polymodal.config import DataConfig
from polymodal.data.augment import AudioAugmentSettings, AugmentSettings, ImageAugmentSettings, augment_sample, sample_rng, spec_augment
from polymodal.data.batch import ItemKey, Sample
from polymodal.data.collate import Collator
from polymodal.data.keyed import TrainingItems, load_noise_clips
from polymodal.data.text import TextTokenizer
from polymodal.errors import ConfigError, DataError
from polymodal.modality import Modality
from polymodal.training.sampler import EpochSampler, build_loader

RATE = 16000
CHAIN = AugmentSettings(audio=AudioAugmentSettings(speed_p=1.0, noise_p=1.0, gain_p=1.0))
MASKS = AudioAugmentSettings(spec_augment_p=1.0, freq_masks=2, freq_mask_width=6, time_masks=2, time_mask_width=8)
SETTINGS = dict(sample_rate=RATE, n_fft=400, hop_length=160, num_mels=24, max_text_tokens=12, max_audio_seconds=0.5)


class Clips(Dataset):
    """Six labelled sine clips of different lengths; item 3 fails to load."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> Sample | None:
        if index == 3:
            return None
        t = torch.arange(2000 + 700 * index) / RATE
        return Sample(text=f"number {index}", audio=0.4 * torch.sin(2 * torch.pi * (200 + 50 * index) * t), label=index)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train([f"number {n}" for n in range(10)], vocab_size=280)


def test_the_sampler_hands_out_keys_of_its_epoch_and_permutation():
    plain = iter(EpochSampler(5, seed=2))
    keyed = iter(EpochSampler(5, seed=2, keyed=True))
    for position in range(12):
        key = next(keyed)
        assert key == ItemKey(position // 5, next(plain))
    resumed = iter(EpochSampler(5, seed=2, start=7, keyed=True))
    fresh = iter(EpochSampler(5, seed=2, keyed=True))
    assert [next(resumed) for _ in range(6)] == [next(fresh) for _ in range(13)][7:]


def test_an_items_augmentation_is_its_keys_whatever_the_order():
    items = TrainingItems(Clips(), augment=CHAIN, seed=4, sample_rate=RATE)
    first = items[ItemKey(1, 2)]
    items[ItemKey(0, 5)]  # anything loaded in between changes nothing
    again = items[ItemKey(1, 2)]
    assert torch.equal(first.audio, again.audio) and first.key == ItemKey(1, 2)
    expected = augment_sample(Clips()[2], CHAIN, seed=4, epoch=1, index=2, sample_rate=RATE)
    assert torch.equal(first.audio, expected.audio)  # the library's augmentation, keyed by (seed, epoch, index)
    assert not torch.equal(items[ItemKey(2, 2)].audio, first.audio)  # another epoch: another draw
    assert items[ItemKey(0, 3)] is None  # a failed item stays failed
    plain = TrainingItems(Clips())
    assert torch.equal(plain[4].audio, Clips()[4].audio) and plain[4].key == ItemKey(0, 4)


class Pictures(Clips):
    """Clips with an image each (item 3 still fails)."""

    def __getitem__(self, index: int) -> Sample | None:
        sample = super().__getitem__(index)
        if sample is None:
            return None
        image = torch.zeros(1, 16, 24)
        image[:, 4:12, 3 + 2 * index : 6 + 2 * index] = 1.0
        return dataclasses.replace(sample, image=image)


def test_a_batch_of_items_equals_its_items_one_by_one():
    """The DataLoader asks for a batch at once (``__getitems__``), which warps its images together;
    each item equals ``items[key]`` and the library's ``augment_sample`` on it alone."""
    both = dataclasses.replace(CHAIN, image=ImageAugmentSettings(elastic_p=0.7, affine_p=0.7, stroke_p=0.5))
    items = TrainingItems(Pictures(), augment=both, seed=4, sample_rate=RATE)
    keys = [ItemKey(1, 2), ItemKey(1, 3), ItemKey(0, 5), ItemKey(2, 2), 4, ItemKey(1, 0)]
    batch = items.__getitems__(keys)
    assert batch[1] is None and batch[4].key == ItemKey(0, 4)
    for key, got in zip(keys, batch):
        if got is None:
            continue
        alone = items[key]
        expected = augment_sample(Pictures()[got.key.index], both, seed=4, epoch=got.key.epoch, index=got.key.index, sample_rate=RATE)
        for other in (alone, expected):
            assert torch.equal(got.image, other.image) and torch.equal(got.audio, other.audio)
        assert not torch.equal(got.image, Pictures()[got.key.index].image)  # something fired
    assert not torch.equal(batch[0].image, batch[3].image)  # item 2 in epochs 1 and 2: drawn afresh


def test_the_loader_gives_the_same_batches_in_worker_processes(tokenizer):
    collator = Collator(tokenizer, **SETTINGS, spec_augment=MASKS, seed=4)
    items = TrainingItems(Clips(), augment=CHAIN, seed=4, sample_rate=RATE)

    def batches(workers: int, start: int) -> list:
        loader = build_loader(items, collator, batch_size=2, seed=1, start=start, num_workers=workers)
        stream = iter(loader)
        return [next(stream) for _ in range(4)]

    main, workers = batches(0, 0), batches(2, 2)  # workers, and resumed one batch later
    for a, b in zip(main[1:], workers):
        assert torch.equal(a.indices, b.indices)
        assert torch.equal(a.inputs[Modality.AUDIO], b.inputs[Modality.AUDIO])


def test_spec_augment_masks_keyed_items_as_each_alone(tokenizer):
    collator = Collator(tokenizer, **SETTINGS, spec_augment=MASKS, seed=9)
    keys = [ItemKey(0, 1), ItemKey(3, 4)]
    samples = [dataclasses.replace(Clips()[k.index], key=k) for k in keys]
    batch = collator(samples)
    assert batch.indices.tolist() == [1, 4]
    clean = Collator(tokenizer, **SETTINGS)(samples)
    features, mask = clean.inputs[Modality.AUDIO], clean.masks[Modality.AUDIO]
    rngs = [sample_rng(9, k.epoch, k.index, stream="spec_augment") for k in keys]
    expected = spec_augment(features, mask, MASKS, rngs).masked_fill(~mask[..., None], 0.0)
    assert torch.equal(batch.inputs[Modality.AUDIO], expected)
    assert not torch.equal(expected, features)
    # Unkeyed items (evaluation) are never masked, and the batch has no indices.
    unkeyed = collator([Clips()[1], Clips()[4]])
    assert unkeyed.indices is None and torch.equal(unkeyed.inputs[Modality.AUDIO], features)


def test_a_waveform_encoder_gets_samples_and_a_sample_mask(tokenizer):
    collator = Collator(tokenizer, **SETTINGS, audio_input="waveform")
    clips = [Clips()[0], Sample(text="number 1"), Clips()[5]]
    batch = collator(clips)
    waves, mask = batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]
    cut = int(SETTINGS["max_audio_seconds"] * RATE)
    assert waves.shape == (3, min(cut, 2000 + 700 * 5)) and mask.shape == waves.shape
    assert mask.sum(1).tolist() == [2000, 0, min(cut, 5500)]
    assert torch.equal(waves[0, :2000], clips[0].audio) and not waves[0, 2000:].any()
    assert batch.present[Modality.AUDIO].tolist() == [True, False, True]
    log_mel = collator.log_mel_view()(clips)  # judges and statistics read log-mel frames
    assert torch.equal(log_mel.inputs[Modality.AUDIO], Collator(tokenizer, **SETTINGS)(clips).inputs[Modality.AUDIO])
    with pytest.raises(ValueError, match="valid: log_mel, waveform"):
        Collator(tokenizer, **SETTINGS, audio_input="mfcc")


def test_noise_clips_come_from_a_manifest(tmp_path):
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 4000).astype(np.float32)
    soundfile.write(tmp_path / "hum.wav", noise, 8000, subtype="FLOAT")
    (tmp_path / "noise.jsonl").write_text(json.dumps({"audio": "hum.wav"}) + "\n" + json.dumps({"text": "no audio"}) + "\n")
    data = DataConfig(augment=AugmentSettings(noise_manifest=str(tmp_path / "noise.jsonl")))
    (clip,) = load_noise_clips(data)
    assert clip.shape == (8000,)  # 0.5 s resampled to the data's 16 kHz, not cut to max_audio_seconds
    assert load_noise_clips(DataConfig()) == []
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "nothing"}) + "\n")
    with pytest.raises(DataError, match="no readable audio"):
        load_noise_clips(DataConfig(augment=AugmentSettings(noise_manifest=str(tmp_path / "empty.jsonl"))))
    with pytest.raises(ConfigError, match="noise_manifest"):
        AugmentSettings(audio=AudioAugmentSettings(noise_p=1.0, noise_weights=(0.0, 0.0, 1.0)))
