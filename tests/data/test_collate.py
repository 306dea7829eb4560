"""Collator: shapes, masks and presence for mixed modalities; padded audio vs the clip alone."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from polymodal.config import DataConfig
from polymodal.data.audio import LogMel, speech_bounds
from polymodal.data.augment import AudioAugmentSettings, AugmentSettings
from polymodal.data.batch import ItemKey, Sample
from polymodal.data.collate import Collator, build_collator
from polymodal.data.image import normalize_images
from polymodal.data.text import TextTokenizer
from polymodal.errors import DataError
from polymodal.modality import Modality

SAMPLE_RATE, N_FFT, HOP, NUM_MELS = 16000, 400, 160, 32
SETTINGS = dict(
    sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, num_mels=NUM_MELS, max_text_tokens=12, max_audio_seconds=0.25
)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train([f"the number {n}" for n in range(100)], vocab_size=300)


@pytest.fixture(scope="module")
def collator(tokenizer) -> Collator:
    return Collator(tokenizer, **SETTINGS)


def _wave(n: int, seed: int) -> torch.Tensor:
    return 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_mixed_modalities(collator: Collator, tokenizer: TextTokenizer) -> None:
    image = torch.rand(1, 8, 12)
    long_text = "the number 1 the number 2 the number 3 the number 4"
    samples = [
        Sample(image=image, text="the number 7", audio=_wave(1000, 0), label=7),
        None,  # failed to load
        Sample(text=long_text),
        Sample(audio=_wave(10000, 1), label=2),  # longer than max_audio_seconds (4000 samples)
        None,
    ]
    before = collator.num_skipped
    batch = collator(samples)
    assert collator.num_skipped == before + 2
    assert batch.size == 3
    torch.testing.assert_close(batch.labels, torch.tensor([7, -1, 2]))
    assert set(batch.inputs) == {Modality.IMAGE, Modality.TEXT, Modality.AUDIO}
    assert set(batch.masks) == {Modality.TEXT, Modality.AUDIO}
    assert batch.present[Modality.IMAGE].tolist() == [True, False, False]
    assert batch.present[Modality.TEXT].tolist() == [True, True, False]
    assert batch.present[Modality.AUDIO].tolist() == [True, False, True]

    images = batch.inputs[Modality.IMAGE]
    assert images.shape == (3, 1, 8, 12)
    torch.testing.assert_close(images[0], normalize_images(image))
    assert images[1:].abs().sum() == 0

    ids, mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    assert ids.shape == mask.shape == (3, 12) and ids.dtype == torch.long  # the long caption hits max_text_tokens
    short = tokenizer.encode("the number 7")
    expected_short = [tokenizer.bos_id, *short, tokenizer.eos_id]
    assert ids[0, : len(expected_short)].tolist() == expected_short
    assert (ids[0, len(expected_short) :] == tokenizer.pad_id).all()
    assert mask[0].tolist() == [True] * len(expected_short) + [False] * (12 - len(expected_short))
    assert ids[1].tolist() == [tokenizer.bos_id, *tokenizer.encode(long_text)[:10], tokenizer.eos_id]
    assert mask[1].all()
    assert (ids[2] == tokenizer.pad_id).all() and not mask[2].any()
    assert tokenizer.decode(ids[0].tolist()) == "the number 7"

    features, frames = batch.inputs[Modality.AUDIO], batch.masks[Modality.AUDIO]
    num_frames = 1 + 4000 // HOP  # the long clip was cut to 0.25 s
    assert features.shape == (3, num_frames, NUM_MELS) and frames.shape == (3, num_frames)
    assert frames.sum(1).tolist() == [1 + 1000 // HOP, 0, num_frames]
    assert (features[~frames] == 0).all()  # padding and absent items read as zeros
    log_mel = LogMel(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, num_mels=NUM_MELS)
    alone = log_mel(_wave(10000, 1)[None, :4000])
    torch.testing.assert_close(features[2], alone[0])


@pytest.mark.parametrize("length", [1000, 1234, 2560, 3999])
def test_padded_clip_equals_clip_alone_on_valid_frames(collator: Collator, length: int) -> None:
    """Frame t sees samples [t*hop - n_fft/2, t*hop + n_fft/2). Alone, the clip's end is reflect-padded;
    in the batch it is followed by zeros. So frames whose window stays inside the clip
    (t*hop + n_fft/2 <= length) are identical, and only the last ceil((n_fft/2) / hop) frames or fewer
    (here at most 2) can differ. The start is reflect-padded the same way in both."""
    clip = _wave(length, 3)
    batch = collator([Sample(audio=clip), Sample(audio=_wave(4000, 4))])
    padded = batch.inputs[Modality.AUDIO][0]
    alone = LogMel(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, num_mels=NUM_MELS)(clip[None])[0]
    valid = int(batch.masks[Modality.AUDIO][0].sum())
    assert valid == alone.shape[0] == 1 + length // HOP
    inside = (length - N_FFT // 2) // HOP + 1  # frames 0 .. inside-1 never see past the clip's end
    torch.testing.assert_close(padded[:inside], alone[:inside], atol=1e-5, rtol=0)
    edge = valid - inside
    assert 1 <= edge <= -(-(N_FFT // 2) // HOP)
    # the edge frames really differ: reflect padding vs zero padding of a noise clip
    assert (padded[inside:valid] - alone[inside:valid]).abs().max() > 1e-3


def test_absent_modality_is_absent(collator: Collator) -> None:
    batch = collator([Sample(text="the number 1", label=1), Sample(text="the number 22", label=2)])
    assert set(batch.inputs) == set(batch.masks) == set(batch.present) == {Modality.TEXT}
    assert batch.present[Modality.TEXT].all()


def test_simple_vs_batch_text_path(collator: Collator, tokenizer: TextTokenizer) -> None:
    texts = ["the number 5", "", "the number 123 and more", "x"]
    batch = collator([Sample(text=t) for t in texts])
    ids, mask = batch.inputs[Modality.TEXT], batch.masks[Modality.TEXT]
    for row, m, text in zip(ids, mask, texts):
        expected = [tokenizer.bos_id, *tokenizer.encode(text)[:10], tokenizer.eos_id]
        assert row[m].tolist() == expected


def test_all_failed_gives_empty_batch(collator: Collator) -> None:
    before = collator.num_skipped
    batch = collator([None, None])
    assert batch.size == 0 and batch.inputs == {} and collator.num_skipped == before + 2


def test_image_shape_mismatch_is_explained(collator: Collator) -> None:
    with pytest.raises(DataError, match="differ in shape"):
        collator([Sample(image=torch.rand(1, 8, 8)), Sample(image=torch.rand(1, 8, 9))])


def test_build_collator_from_config(tokenizer: TextTokenizer) -> None:
    config = DataConfig()
    collator = build_collator(tokenizer, config)
    batch = collator([Sample(audio=_wave(config.sample_rate * 3, 0), text="the number 9")])
    num_frames = 1 + int(config.sample_rate * config.max_audio_seconds) // config.hop_length
    assert batch.inputs[Modality.AUDIO].shape == (1, num_frames, config.num_mels)
    assert batch.inputs[Modality.TEXT].shape[1] <= config.max_text_tokens
    with pytest.raises(ValueError, match="max_text_tokens"):
        Collator(tokenizer, **{**SETTINGS, "max_text_tokens": 1})


def test_trimmed_clip_equals_the_clip_cut_by_hand(tokenizer: TextTokenizer) -> None:
    # The collator's trim (data.trim_db) against cutting the clip at speech_bounds before collating;
    # and the floor (data.top_db) against LogMel's own. The word sits in near-silence, so both bite.
    quiet = 1e-4 * _wave(1600, 1)
    clip = torch.cat([quiet, _wave(1200, 2), quiet])
    trimming = Collator(tokenizer, **SETTINGS, trim_db=30.0, top_db=40.0)
    start, end = speech_bounds(clip, top_db=30.0, frame_length=N_FFT, hop_length=HOP)
    assert 1200 <= start <= 1600 and 2800 <= end <= 3200
    trimmed = trimming([Sample(audio=clip)])
    by_hand = Collator(tokenizer, **SETTINGS)([Sample(audio=clip[start:end])])
    expected = LogMel(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP, num_mels=NUM_MELS, top_db=40.0)(clip[None, start:end])
    torch.testing.assert_close(trimmed.masks[Modality.AUDIO], by_hand.masks[Modality.AUDIO])
    torch.testing.assert_close(trimmed.inputs[Modality.AUDIO], expected)
    assert not torch.equal(trimmed.inputs[Modality.AUDIO], by_hand.inputs[Modality.AUDIO])  # the floor changed it
    config = build_collator(tokenizer, DataConfig(trim_db=30.0, top_db=40.0))
    assert (config.trim_db, config.log_mel.top_db) == (30.0, 40.0)


def _keyed(lengths: list[int], epoch: int = 0, first: int = 0) -> list[Sample]:
    return [Sample(audio=_wave(n, first + i), key=ItemKey(epoch, first + i)) for i, n in enumerate(lengths)]


def test_kept_log_mels_equal_the_batched_path(tokenizer: TextTokenizer) -> None:
    # Kept (cached) frames against the batched STFT, every clip followed by zeros in both: the
    # batched batch gets one longer clip (last, its rows not compared). Then every later batch,
    # in any grouping and from a fresh collator (a resumed run), reads the same values bitwise.
    lengths = [1000, 2400, 3600, 640]  # each at least n_fft / 2 shorter than the batched batch's 4000
    kept = Collator(tokenizer, **SETTINGS, cache_log_mel=True)
    first = kept(_keyed(lengths))
    batched = Collator(tokenizer, **SETTINGS)([*_keyed(lengths), Sample(audio=_wave(4000, 99), key=ItemKey(0, 99))])
    audio, mask = first.inputs[Modality.AUDIO], first.masks[Modality.AUDIO]
    torch.testing.assert_close(mask, batched.masks[Modality.AUDIO][:4, : mask.shape[1]])
    torch.testing.assert_close(audio, batched.inputs[Modality.AUDIO][:4, : audio.shape[1]], atol=1e-5, rtol=0)
    assert len(kept._log_mels) == 4
    again = kept(_keyed(lengths, epoch=3))  # all hits
    assert torch.equal(again.inputs[Modality.AUDIO], audio)
    fresh = Collator(tokenizer, **SETTINGS, cache_log_mel=True)
    regrouped = fresh(_keyed(lengths[2:], first=2))  # 3600 is now the longest, not followed by a longer clip
    assert torch.equal(regrouped.inputs[Modality.AUDIO][0, : int(mask[2].sum())], audio[2, : int(mask[2].sum())])
    assert torch.equal(regrouped.inputs[Modality.AUDIO][1, : int(mask[3].sum())], audio[3, : int(mask[3].sum())])


def test_kept_log_mels_are_not_spec_augmented_in_place(tokenizer: TextTokenizer) -> None:
    # SpecAugment masks the kept frames afresh each epoch; the kept frames stay clean. Evaluation
    # items (no key) never touch the cache, and waveform augmentation turns it off.
    masking = AudioAugmentSettings(spec_augment_p=1.0)
    kept = Collator(tokenizer, **SETTINGS, spec_augment=masking, cache_log_mel=True)
    clean = Collator(tokenizer, **SETTINGS, cache_log_mel=True)(_keyed([3000, 3600]))
    epochs = [kept(_keyed([3000, 3600], epoch=e)).inputs[Modality.AUDIO] for e in (0, 1)]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[0], clean.inputs[Modality.AUDIO])
    assert torch.equal(pad_sequence([kept._log_mels[0], kept._log_mels[1]], batch_first=True), clean.inputs[Modality.AUDIO])
    kept([Sample(audio=_wave(2000, 7))])
    assert len(kept._log_mels) == 2
    assert build_collator(tokenizer, DataConfig()).cache_log_mel
    augmented = DataConfig(augment=AugmentSettings(audio=AudioAugmentSettings(noise_p=0.5)))
    assert not build_collator(tokenizer, augmented).cache_log_mel
