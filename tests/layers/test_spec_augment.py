"""SpecAugment: identity when it should be, masks that stay inside the real frames, filled with the
item's mean, widths drawn uniformly up to the limit, and the audio encoder using it only in training."""

from __future__ import annotations

import pytest
import torch

from polymodal.encoders import ENCODERS
from polymodal.layers.spec_augment import SpecAugment


def _batch(batch: int = 64, frames: int = 40, bands: int = 16):
    torch.manual_seed(0)
    mels = torch.randn(batch, frames, bands) - 8.0
    lengths = torch.randint(frames // 2, frames + 1, (batch,))
    mask = torch.arange(frames)[None] < lengths[:, None]
    return mels, mask, lengths


def test_identity_in_eval_mode_and_without_masks():
    mels, mask, _ = _batch()
    assert torch.equal(SpecAugment(freq_masks=2, time_masks=2).eval()(mels, mask), mels)
    assert torch.equal(SpecAugment().train()(mels, mask), mels)


def test_masked_entries_hold_the_item_mean_and_padding_is_untouched():
    mels, mask, _ = _batch()
    out = SpecAugment(freq_masks=2, time_masks=2).train()(mels, mask)
    changed = out != mels
    assert changed.any()
    assert not changed[~mask].any()
    real = mask[:, :, None].expand_as(mels)
    means = torch.stack([mels[i][real[i]].mean() for i in range(len(mels))])  # the simple way
    expected = means[:, None, None].expand_as(mels)
    assert torch.allclose(out[changed], expected[changed], atol=1e-5)


@pytest.mark.parametrize("axis", ["freq", "time"])
def test_one_mask_is_one_contiguous_span_of_uniform_width(axis):
    width = 6
    torch.manual_seed(1)
    mels, mask, lengths = _batch(batch=4000)
    spec = SpecAugment(freq_masks=1, freq_mask_width=width) if axis == "freq" else SpecAugment(time_masks=1, time_mask_width=width)
    hidden = spec.train()(mels, mask) != mels
    if axis == "freq":
        assert torch.equal(hidden.any(1), hidden[:, 0, :])  # the same bins in every frame
        banded = hidden.any((1, 2))  # items drawn a width above 0
        assert torch.equal(hidden.any(2)[banded], mask[banded])  # every real frame, no padded one
        spans = hidden[:, 0, :]
    else:
        assert torch.equal(hidden.any(2)[:, :, None].expand_as(hidden), hidden)  # whole frames
        spans = hidden.any(2)
        last = torch.where(spans.any(1), (spans * torch.arange(spans.shape[1])).amax(1), torch.zeros_like(lengths))
        assert (last < lengths).all()
    widths = spans.sum(1)
    first = spans.float().argmax(1)
    contiguous = [bool(spans[i, first[i] : first[i] + widths[i]].all()) for i in range(len(spans))]
    assert all(contiguous)
    counts = torch.bincount(widths, minlength=width + 1)
    assert len(counts) == width + 1  # never wider than the limit
    assert (counts > 0.6 * len(widths) / (width + 1)).all()  # every width 0..limit drawn, about equally


def test_audio_encoder_masks_only_in_training():
    encoder = ENCODERS.build({"name": "audio_conv", "dim": 16, "freq_masks": 2, "time_masks": 2}, 16)
    mels, mask, _ = _batch(batch=4)
    encoder.eval()
    first = encoder(mels, mask).tokens
    assert torch.equal(encoder(mels, mask).tokens, first)
    encoder.train()
    assert not torch.allclose(encoder(mels, mask).tokens, first)
    plain = ENCODERS.build({"name": "audio_conv", "dim": 16}, 16)
    assert encoder.state_dict().keys() == plain.state_dict().keys()  # checkpoints unaffected


def test_negative_settings_are_rejected():
    with pytest.raises(ValueError, match="time_mask_width"):
        SpecAugment(time_mask_width=-1)
