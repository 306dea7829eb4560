"""The audio encoder's per-clip input normalisation: equal to a numpy reference computed clip by
clip on its real frames; blind to a gain or a fixed channel response (a constant added to a band's
log power); a clip's tokens do not depend on the padding after it; dropout only while training."""

from __future__ import annotations

import numpy as np
import torch

from polymodal.data.audio import NORM_EPS, utterance_norm
from polymodal.encoders.audio_conv import AudioConvEncoder


def _reference(mels: np.ndarray) -> np.ndarray:
    """One clip's real frames (F, M): bands centred, then divided by the clip's std."""
    centered = mels - mels.mean(axis=0, keepdims=True)
    return centered / np.sqrt(np.mean(centered**2) + NORM_EPS)


def _batch(lengths=(40, 23, 31), mels=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), mels, generator=gen) * 3 - 8
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]  # (B, F)
    return x.masked_fill(~mask[..., None], 0.0), mask


def test_equals_the_clip_by_clip_reference_and_zeroes_padding():
    x, mask = _batch()
    out = utterance_norm(x, mask)
    for b, n in enumerate(mask.sum(1).tolist()):
        np.testing.assert_allclose(out[b, :n].numpy(), _reference(x[b, :n].double().numpy()), rtol=1e-4, atol=1e-5)
        assert not out[b, n:].any()
    np.testing.assert_allclose(utterance_norm(x[:1], None)[0].numpy(), _reference(x[0].double().numpy()), rtol=1e-4, atol=1e-5)


def test_a_gain_or_a_fixed_channel_changes_nothing():
    x, mask = _batch()
    channel = torch.linspace(-3.0, 2.0, x.shape[-1])  # per-band log gain: a microphone's response
    shifted = (x + channel + 1.7).masked_fill(~mask[..., None], 0.0)
    torch.testing.assert_close(utterance_norm(shifted, mask), utterance_norm(x, mask), rtol=1e-4, atol=1e-4)


def test_a_clips_tokens_do_not_depend_on_the_padding_after_it():
    torch.manual_seed(0)
    encoder = AudioConvEncoder(16, dim=32, num_convs=2, input_norm=True).eval()
    x, mask = _batch()
    alone = encoder(x[1:2, :23], mask[1:2, :23])
    padded = encoder(x, mask)
    n = int(alone.mask.sum())
    torch.testing.assert_close(padded.tokens[1, :n], alone.tokens[0, :n])


def test_dropout_only_while_training():
    torch.manual_seed(0)
    encoder = AudioConvEncoder(16, dim=32, input_norm=True, dropout=0.5)
    x, mask = _batch()
    assert torch.equal(encoder.eval()(x, mask).tokens, encoder.eval()(x, mask).tokens)
    assert not torch.equal(encoder.train()(x, mask).tokens, encoder.eval()(x, mask).tokens)
