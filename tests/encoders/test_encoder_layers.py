"""The optional transformer layers of the text and audio encoders: an item's real tokens come out the
same alone as padded inside a batch (masked attention, padding-blind subsampling), intermediates,
meta construction, and ``num_layers=0`` keeping the embedding-only / conv-only encoders as they were."""

from __future__ import annotations

import pytest
import torch

from polymodal.encoders import ENCODERS

DIM = 16
VOCAB = 30
NUM_MELS = 8


def _text(num_layers: int = 2):
    torch.manual_seed(0)
    return ENCODERS.build({"name": "text_embedding", "dim": DIM, "num_layers": num_layers, "num_heads": 2}, VOCAB)


def _audio(num_layers: int = 2):
    torch.manual_seed(0)
    spec = {"name": "audio_conv", "dim": DIM, "num_layers": num_layers, "num_heads": 2}
    return ENCODERS.build(spec, NUM_MELS)


def _padded_text_batch(item: torch.Tensor, length: int, pad_id: int):
    """[item padded with pad_id, a full-length other text] and its mask."""
    ids = torch.randint(0, VOCAB, (2, length))
    ids[0] = pad_id
    ids[0, : item.shape[0]] = item
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, item.shape[0] :] = False
    return ids, mask


@pytest.mark.parametrize("num_layers", [0, 2])
@pytest.mark.parametrize("pad_id", [0, 17])
def test_text_padding_does_not_change_real_tokens(num_layers, pad_id):
    encoder = _text(num_layers).eval()
    torch.manual_seed(1)
    item = torch.randint(0, VOCAB, (5,))
    with torch.no_grad():
        alone = encoder(item[None]).tokens[0]  # (5, D), no padding, no mask
        ids, mask = _padded_text_batch(item, 9, pad_id)
        out = encoder(ids, mask)
    assert torch.isfinite(out.tokens).all()  # padded queries attend themselves: no NaN rows
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.tokens[0, :5], alone, rtol=1e-5, atol=1e-5)
    if num_layers:
        # The mask is what makes it so: attending the padding changes the real tokens.
        with torch.no_grad():
            unmasked = encoder(ids).tokens[0, :5]
        assert (unmasked - alone).abs().max() > 1e-3


@pytest.mark.parametrize("num_layers", [0, 2])
@pytest.mark.parametrize("pad_value", [0.0, 3.0])
def test_audio_padding_does_not_change_real_tokens(num_layers, pad_value):
    encoder = _audio(num_layers).eval()
    torch.manual_seed(1)
    # 13 frames -> 7 -> 4: both convs' last real output sits at the item's edge, reading padding.
    item = torch.randn(13, NUM_MELS)
    mels = torch.full((2, 30, NUM_MELS), pad_value)
    mels[0, :13] = item
    mels[1] = torch.randn(30, NUM_MELS)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 13:] = False
    with torch.no_grad():
        alone = encoder(item[None]).tokens[0]  # (4, D)
        out = encoder(mels, mask)
    assert alone.shape == (4, DIM) and out.tokens.shape == (2, 8, DIM)
    assert torch.isfinite(out.tokens).all()
    assert out.mask[0].tolist() == [True] * 4 + [False] * 4 and out.mask[1].all()
    torch.testing.assert_close(out.tokens[0, :4], alone, rtol=1e-5, atol=1e-5)


def test_audio_without_mask_is_unchanged_by_the_masking():
    # An all-True mask takes the masked path; no mask the plain one: same tokens.
    encoder = _audio(2).eval()
    mels = torch.randn(2, 21, NUM_MELS)
    with torch.no_grad():
        plain = encoder(mels).tokens
        masked = encoder(mels, torch.ones(2, 21, dtype=torch.bool)).tokens
    torch.testing.assert_close(masked, plain)


@pytest.mark.parametrize("kind", ["text", "audio"])
def test_forward_intermediates(kind):
    if kind == "text":
        encoder = _text(3).eval()
        inputs = _padded_text_batch(torch.tensor([3, 4, 5]), 6, 0)
        expected_hidden = 3
    else:
        encoder = _audio(3).eval()
        mask = torch.ones(2, 20, dtype=torch.bool)
        mask[0, 11:] = False
        inputs = (torch.randn(2, 20, NUM_MELS), mask)
        expected_hidden = encoder.num_convs + 3
    with torch.no_grad():
        inter = encoder.forward_intermediates(*inputs)
        out = encoder(*inputs)
    assert len(inter.hidden) == expected_hidden
    assert torch.equal(inter.output.tokens, out.tokens)
    assert torch.equal(inter.output.mask, out.mask)
    torch.testing.assert_close(inter.output.tokens, encoder.final_norm(inter.hidden[-1]))


def test_no_layers_keeps_the_old_parameters_and_outputs():
    text = _text(0)
    assert set(text.state_dict()) == {"embed.weight", "pos"}
    ids = torch.randint(0, VOCAB, (2, 6))
    inter = text.forward_intermediates(ids)
    torch.testing.assert_close(inter.output.tokens, text.embed.weight[ids] + text.pos[:, :6])
    assert len(inter.hidden) == 1

    audio = _audio(0)
    assert set(audio.state_dict()) == {"convs.0.weight", "convs.0.bias", "convs.2.weight", "convs.2.bias",
                                       "norm.weight", "norm.bias"}
    assert len(audio.forward_intermediates(torch.randn(2, 12, NUM_MELS)).hidden) == 2


@pytest.mark.parametrize("kind", ["text", "audio"])
def test_builds_on_meta_and_every_parameter_gets_a_gradient(kind):
    build = _text if kind == "text" else _audio
    with torch.device("meta"):
        meta = build(2)
    real = build(2)
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}

    if kind == "text":
        inputs = _padded_text_batch(torch.tensor([1, 2, 3]), 7, 0)
    else:
        mask = torch.ones(2, 16, dtype=torch.bool)
        mask[0, 9:] = False
        inputs = (torch.randn(2, 16, NUM_MELS), mask)
    (real(*inputs).tokens ** 2).mean().backward()
    missing = [n for n, p in real.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing
