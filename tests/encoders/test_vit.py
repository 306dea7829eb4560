"""The ViT image encoder: patch embedding against an explicit unfold + matmul, the CLS token and the
token count, 2-D sin-cos positions checked by hand, intermediates, meta construction and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.encoders import ENCODERS
from polymodal.encoders.vit import ViTEncoder
from polymodal.layers.positional import sincos_2d_embedding

BATCH = 2


def _vit(**settings) -> ViTEncoder:
    torch.manual_seed(0)
    spec = {"name": "vit", "dim": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2, **settings}
    return ENCODERS.build(spec, 3, (8, 12))


def test_patch_embedding_equals_unfold_matmul():
    encoder = _vit(cls_token=False).double()
    with torch.no_grad():
        encoder.pos.zero_()  # leave only the patch projection
    images = torch.randn(BATCH, 3, 8, 12, dtype=torch.float64)

    columns = F.unfold(images, kernel_size=4, stride=4)  # (B, C*p*p, N), patches row-major
    weight = encoder.patch_embed.weight.reshape(16, -1)  # (dim, C*p*p), same (c, i, j) order as unfold
    expected = (weight @ columns).transpose(1, 2) + encoder.patch_embed.bias  # (B, N, dim)

    assert expected.shape == (BATCH, 2 * 3, 16)
    torch.testing.assert_close(encoder.embed(images), expected, rtol=1e-12, atol=1e-12)


def test_cls_token_first_and_output_shape():
    encoder = _vit().eval()
    images = torch.randn(BATCH, 3, 8, 12)
    tokens = encoder(images).tokens
    assert tokens.shape == (BATCH, 1 + (8 // 4) * (12 // 4), 16)
    assert torch.isfinite(tokens).all()

    embedded = encoder.embed(images)
    # The first token is the CLS vector plus its position, whatever the image.
    cls = (encoder.cls_token + encoder.pos[:, :1])[0, 0]
    for b in range(BATCH):
        torch.testing.assert_close(embedded[b, 0], cls)
    # Without a CLS token: one token per patch only.
    assert _vit(cls_token=False)(images).tokens.shape == (BATCH, 6, 16)


def test_sincos_2d_embedding_by_hand():
    # dim 4: one frequency (1.0) per axis, so cell (r, c) -> [sin r, cos r, sin c, cos c].
    table = sincos_2d_embedding(2, 3, 4)
    expected = torch.tensor(
        [[math.sin(r), math.cos(r), math.sin(c), math.cos(c)] for r in range(2) for c in range(3)]
    )
    torch.testing.assert_close(table, expected)

    # dim 8: two frequencies per axis, 1 and 10000^(-1/2) = 0.01; sines first, then cosines.
    r, c = 1, 2
    row = [math.sin(r), math.sin(0.01 * r), math.cos(r), math.cos(0.01 * r)]
    col = [math.sin(c), math.sin(0.01 * c), math.cos(c), math.cos(0.01 * c)]
    torch.testing.assert_close(sincos_2d_embedding(2, 3, 8)[r * 3 + c], torch.tensor(row + col))


def test_sinusoidal_positions_in_the_encoder():
    encoder = _vit(positions="sinusoidal")
    assert encoder.pos is None  # nothing learned
    with torch.no_grad():
        encoder.patch_embed.weight.zero_()
        encoder.patch_embed.bias.zero_()
    embedded = encoder.embed(torch.randn(BATCH, 3, 8, 12))  # (B, 1 + 6, 16)
    grid = sincos_2d_embedding(2, 3, 16)
    for b in range(BATCH):
        torch.testing.assert_close(embedded[b, 0], encoder.cls_token[0, 0])  # the CLS token has no position
        torch.testing.assert_close(embedded[b, 1:], grid)


def test_each_token_reads_only_its_patch():
    encoder = _vit(cls_token=False)
    images = torch.randn(1, 3, 8, 12)
    changed = images.clone()
    changed[..., 4:8, 8:12] += 1.0  # the patch in grid row 1, column 2 -> token 1 * 3 + 2
    delta = (encoder.embed(changed) - encoder.embed(images)).abs().sum(-1)[0]  # (N,)
    assert delta[5] > 0
    assert torch.equal(delta[:5], torch.zeros(5))


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_forward_intermediates(positions):
    encoder = _vit(positions=positions, num_layers=3).eval()
    images = torch.randn(BATCH, 3, 8, 12)
    inter = encoder.forward_intermediates(images)
    assert len(inter.hidden) == 3
    assert all(h.shape == (BATCH, 7, 16) for h in inter.hidden)
    assert torch.equal(inter.output.tokens, encoder(images).tokens)
    torch.testing.assert_close(inter.output.tokens, encoder.final_norm(inter.hidden[-1]))
    assert inter.output.mask is None


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_builds_on_meta(positions):
    with torch.device("meta"):
        meta = _vit(positions=positions)
    real = _vit(positions=positions)
    assert all(p.is_meta for p in meta.parameters())
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert meta(torch.randn(BATCH, 3, 8, 12, device="meta")).tokens.shape == (BATCH, 7, 16)


def test_gradient_reaches_every_parameter():
    encoder = _vit()
    (encoder(torch.randn(BATCH, 3, 8, 12)).tokens ** 2).mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        ENCODERS.build({"name": "vit", "patch_size": 5}, 3, (32, 32))
    with pytest.raises(ValueError, match="valid: learned, sinusoidal"):
        ENCODERS.build({"name": "vit", "positions": "rope"}, 3, (32, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        ENCODERS.build({"name": "vit", "dim": 18, "num_heads": 2, "positions": "sinusoidal"}, 3, (32, 32))
    with pytest.raises(ValueError, match="built for"):
        _vit()(torch.randn(1, 3, 16, 12))
