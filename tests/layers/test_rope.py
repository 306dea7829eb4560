"""RoPE against a complex-number reference, and the relative-position property of the scores."""

from __future__ import annotations

import pytest
import torch

from polymodal.layers.rope import RotaryEmbedding


def _complex_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate half-split pairs (x_k, x_{k+d/2}) as the complex number x_k + i x_{k+d/2} by e^{i p theta_k}."""
    head_dim = x.shape[-1]
    theta = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
    angles = positions.double()[:, None, :, None] * theta  # (B, 1, N, d/2)
    x = x.double()
    z = torch.complex(x[..., : head_dim // 2], x[..., head_dim // 2 :]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((z.real, z.imag), dim=-1)


def test_rope_matches_complex_reference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, base=500.0)
    x = torch.randn(2, 3, 9, 16)
    positions = torch.tensor([list(range(9)), [5, 3, 100, 0, 1, 2, 7, 8, 2000]])
    out = rope(positions).rotate(x)
    reference = _complex_reference(x, positions, 500.0)
    torch.testing.assert_close(out.double(), reference, rtol=1e-4, atol=1e-4)  # fp32 angles at position 2000
    out64 = rope(positions, dtype=torch.float64).rotate(x.double())
    torch.testing.assert_close(out64, reference, rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_only_on_position_difference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(32)
    q = torch.randn(1, 1, 1, 32, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(pq: int, pk: int) -> torch.Tensor:
        qr = rope(torch.tensor([[pq]]), dtype=torch.float64).rotate(q)
        kr = rope(torch.tensor([[pk]]), dtype=torch.float64).rotate(k)
        return (qr * kr).sum()

    same_offset = torch.stack([score(3, 1), score(13, 11), score(503, 501)])
    torch.testing.assert_close(same_offset, score(2, 0).expand(3), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(score(3, 1), score(3, 2))  # a different offset gives a different score


def test_rope_preserves_norm_and_position_zero_is_identity():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 2, 5, 8)
    out = rope(torch.arange(5).expand(2, 5)).rotate(x)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])
    assert rope(torch.arange(5).expand(2, 5)).rotate(x.bfloat16()).dtype == torch.bfloat16


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)
