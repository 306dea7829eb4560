"""The optional transformer layers of the text and audio encoders: an item's real tokens come out the
same alone as padded inside a batch (masked attention, padding-blind subsampling), intermediates,
meta construction, and ``num_layers=0`` keeping the embedding-only / conv-only encoders as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.encoders import ENCODERS
from polymodal.encoders.audio_conv import BandResBlock
from polymodal.layers.positional import sinusoidal_embedding

DIM = 16
VOCAB = 30
NUM_MELS = 8


def _text(num_layers: int = 2):
    torch.manual_seed(0)
    return ENCODERS.build({"name": "text_embedding", "dim": DIM, "num_layers": num_layers, "num_heads": 2}, VOCAB)


def _audio(num_layers: int = 2, freq_channels: int = 0, num_mels: int = NUM_MELS, res_blocks: int = 0):
    torch.manual_seed(0)
    spec = {"name": "audio_conv", "dim": DIM, "num_layers": num_layers, "num_heads": 2, "freq_channels": freq_channels, "res_blocks": res_blocks}
    return ENCODERS.build(spec, num_mels)


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
@pytest.mark.parametrize("freq_channels, res_blocks", [(0, 0), (3, 0), (3, 2)])
def test_audio_padding_does_not_change_real_tokens(num_layers, pad_value, freq_channels, res_blocks):
    encoder = _audio(num_layers, freq_channels, res_blocks=res_blocks).eval()
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


@pytest.mark.parametrize("freq_channels, res_blocks", [(0, 0), (3, 0), (3, 1)])
def test_audio_without_mask_is_unchanged_by_the_masking(freq_channels, res_blocks):
    # An all-True mask takes the masked path; no mask the plain one: same tokens.
    encoder = _audio(2, freq_channels, res_blocks=res_blocks).eval()
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


def test_band_convs_move_with_the_bands():
    # Without biases the 2-D convs of silence stay 0, so a pattern moved up by the two pools' 4
    # bands comes out moved by one pooled band: what the band-shared weights and pooling are for.
    encoder = _audio(0, freq_channels=3, num_mels=32).eval()
    for layer in encoder.convs:
        if isinstance(layer, torch.nn.Conv2d):
            torch.nn.init.zeros_(layer.bias)
    mels = torch.zeros(2, 12, 32)
    mels[0, :, 8:16] = torch.randn(12, 8)
    mels[1, :, 12:20] = mels[0, :, 8:16]
    with torch.no_grad():
        pooled = encoder.forward_intermediates(mels).hidden[-1].unflatten(-1, (3, 8))  # (2, F', C, 8 bands)
    assert pooled[0].abs().sum() > 0
    torch.testing.assert_close(pooled[1, ..., 1:], pooled[0, ..., :-1])
    assert pooled[1, ..., 0].abs().max() == 0


def _band_stages_by_hand(encoder, mels: torch.Tensor) -> list[torch.Tensor]:
    """Each strided stage's (1, C, bands, F') output, after its residual blocks: F.conv2d, a max
    over band pairs and GELU, then x + conv(gelu(conv(x))) per block."""
    x = mels.transpose(1, 2)[:, None]  # (1, 1, bands, F)
    stages = []
    for layer in encoder.convs:
        if isinstance(layer, torch.nn.Conv2d):
            x = F.conv2d(x, layer.weight, layer.bias, stride=(1, 2), padding=1)
            if x.shape[2] % 2:  # ceil mode: the odd last band is pooled alone
                x = torch.cat([x, x[:, :, -1:]], 2)
            x = F.gelu(x.unflatten(2, (-1, 2)).amax(3))
            stages.append(x)
        elif isinstance(layer, BandResBlock):
            inner = F.gelu(F.conv2d(x, layer.conv1.weight, layer.conv1.bias, padding=1))
            x = stages[-1] = x + F.conv2d(inner, layer.conv2.weight, layer.conv2.bias, padding=1)
    return stages


@pytest.mark.parametrize("res_blocks", [0, 2])
def test_band_convs_written_out(res_blocks):
    # The 2-D path (with residual blocks after each strided conv) by hand, then the flatten and the
    # positions; one hidden state per strided conv, after its blocks.
    encoder = _audio(0, freq_channels=3, num_mels=10, res_blocks=res_blocks).eval()
    assert sum(isinstance(layer, BandResBlock) for layer in encoder.convs) == 2 * res_blocks
    mels = torch.randn(1, 9, 10)
    stages = [x.permute(0, 3, 1, 2).flatten(2) for x in _band_stages_by_hand(encoder, mels)]  # (1, F', C * bands)
    positions = sinusoidal_embedding(torch.arange(stages[-1].shape[1]), DIM)
    with torch.no_grad():
        expected = encoder.norm(encoder.flatten(stages[-1]) + positions)
        inter = encoder.forward_intermediates(mels)
    torch.testing.assert_close(inter.output.tokens, expected)
    assert len(inter.hidden) == len(stages) == 2
    for hidden, stage in zip(inter.hidden, stages):
        torch.testing.assert_close(hidden, stage)


def test_res_blocks_need_band_convs():
    with pytest.raises(ValueError, match="res_blocks=1.*freq_channels"):
        _audio(0, freq_channels=0, res_blocks=1)


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


@pytest.mark.parametrize("kind", ["text", "audio", "audio_bands"])
def test_builds_on_meta_and_every_parameter_gets_a_gradient(kind):
    build = {"text": _text, "audio": _audio, "audio_bands": lambda n: _audio(n, freq_channels=3)}[kind]
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
