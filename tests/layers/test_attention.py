"""SelfAttention against a naive float64 softmax(QK^T / sqrt(d)) V, and its KV-cache path."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.layers.attention import SelfAttention
from polymodal.layers.kv_cache import KVCache
from polymodal.layers.rope import RotaryEmbedding
from polymodal.models.masks import causal_mask


def _naive_attention(attn: SelfAttention, x: torch.Tensor, mask: torch.Tensor | None, rotary) -> torch.Tensor:
    """Per-head loops and an explicit softmax; no SDPA, no einops."""
    b, n, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).reshape(b, n, h, hd).permute(0, 2, 1, 3)
    k = (x @ attn.k_proj.weight.T).reshape(b, n, h, hd).permute(0, 2, 1, 3)
    v = (x @ attn.v_proj.weight.T).reshape(b, n, h, hd).permute(0, 2, 1, 3)
    if attn.q_norm is not None:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + attn.q_norm.eps) * attn.q_norm.weight
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + attn.k_norm.eps) * attn.k_norm.weight
    if rotary is not None:
        q, k = rotary.rotate(q), rotary.rotate(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, N, N)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, N, hd)
    return out.permute(0, 2, 1, 3).reshape(b, n, d) @ attn.o_proj.weight.T


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_naive(qk_norm, masked):
    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=4, qk_norm=qk_norm).double()
    attn.init_weights(std=0.2, out_std=0.2)  # large weights so attention is far from uniform
    if qk_norm:
        with torch.no_grad():
            attn.q_norm.weight.uniform_(0.5, 2.0)
            attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    rotary = RotaryEmbedding(8)(torch.arange(6).expand(2, 6), dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(2, 1, 6, 6) > 0.4
        mask |= torch.eye(6, dtype=torch.bool)  # no fully masked rows
    out = attn(x, rotary=rotary, mask=mask)
    torch.testing.assert_close(out, _naive_attention(attn, x, mask, rotary))


def test_attention_cache_prefix_then_tokens_matches_causal_full():
    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=2).double()
    rope = RotaryEmbedding(16)
    x = torch.randn(3, 8, 32, dtype=torch.float64)
    full = attn(x, rotary=rope(torch.arange(8).expand(3, 8)), mask=causal_mask(8))

    cache = KVCache(1, 3, 2, 8, 16, dtype=torch.float64)
    steps = [attn(x[:, :5], rotary=rope(torch.arange(5).expand(3, 5)), mask=causal_mask(5), cache=cache)]
    cache.advance(5)
    for t in range(5, 8):
        pos = torch.full((3, 1), t)
        steps.append(attn(x[:, t : t + 1], rotary=rope(pos), cache=cache))  # one query sees every cached key
        cache.advance(1)
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == 8


def test_cache_overflow_and_select():
    cache = KVCache(2, 3, 1, 4, 2)
    cache.update(0, torch.ones(3, 1, 4, 2), torch.ones(3, 1, 4, 2))
    cache.advance(4)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.ones(3, 1, 1, 2), torch.ones(3, 1, 1, 2))
    cache.keys[0][1] = 7.0
    cache.select(torch.tensor([1, 0]))
    assert cache.batch_size == 2
    assert torch.all(cache.keys[0][0] == 7.0) and torch.all(cache.keys[0][1] == 1.0)


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(30, num_heads=4)
