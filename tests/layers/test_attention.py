"""SelfAttention against a naive float64 softmax(QK^T / sqrt(d)) V, and its KV-cache path; the
explicit fp32 attention kernel against SDPA (outputs and gradients), the kernel choice, the additive
bias against the boolean mask, and attention over a TokenLayout against the padded grid."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.layers.attention import (
    EXPLICIT_MAX_KEYS,
    SelfAttention,
    TokenLayout,
    attend,
    attention_bias,
    explicit_attention,
    uses_explicit_attention,
)
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


def _qkv(batch: int, queries: int, keys: int, *, heads: int = 4, head_dim: int = 48, seed: int = 0):
    """Random queries, keys and values (the presets' head width 48) and a padding mask in which every
    query may attend its own position (as the models' masks guarantee)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, head_dim, generator=generator)
    k, v = (torch.randn(batch, heads, keys, head_dim, generator=generator) for _ in range(2))
    mask = (torch.rand(batch, 1, queries, keys, generator=generator) > 0.4) | torch.eye(queries, keys, dtype=torch.bool)
    return q, k, v, mask


def _outputs_and_grads(fn, q, k, v, mask):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask)
    out.float().pow(2).sum().backward()  # a loss that weighs every output differently
    return [out, *(t.grad for t in leaves)]


@pytest.mark.parametrize("shape", [(8, 21, 21), (4, 53, 53), (3, 1, 30)], ids=["self-21", "self-53", "one-query-30-keys"])
@pytest.mark.parametrize("as_bias", [False, True], ids=["bool", "bias"])
def test_explicit_attention_matches_sdpa_in_fp32(shape, as_bias):
    q, k, v, mask = _qkv(*shape)
    given = attention_bias(mask) if as_bias else mask

    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    ours = _outputs_and_grads(explicit_attention, q, k, v, given)
    reference = _outputs_and_grads(sdpa, q, k, v, mask)
    for name, got, expected in zip(("output", "dq", "dk", "dv"), ours, reference):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_explicit_attention_by_hand():
    """One query, two keys with scores 0 and ln 3 (after the 1/sqrt(d) scale): weights 1/4, 3/4."""
    q = torch.tensor([[[[2.0, 0.0, 0.0, 0.0]]]])  # (1, 1, 1, 4): scale 1/2
    k = torch.tensor([[[[0.0, 1.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, 0.0]]]])
    v = torch.tensor([[[[4.0, 0.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0]]]])
    out = explicit_attention(q, k, v, None)
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 6.0, 0.0, 0.0]]]]))
    masked = explicit_attention(q, k, v, torch.tensor([True, False]))  # the second key hidden
    torch.testing.assert_close(masked, v[:, :, :1])


def test_bf16_attention_paths_are_close_to_float64():
    """Under bf16 the explicit path keeps its scores in fp32, so it is at least as close to a float64
    reference as SDPA's bf16 kernel, and both are within bf16 rounding of it."""
    q, k, v, mask = _qkv(8, 29, 29, seed=1)
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    low = [t.bfloat16() for t in (q, k, v)]
    explicit = explicit_attention(*low, mask)
    fused = F.scaled_dot_product_attention(*low, attn_mask=mask)
    assert explicit.dtype == torch.bfloat16
    error_explicit = (explicit.double() - reference).abs().max().item()
    error_sdpa = (fused.double() - reference).abs().max().item()
    assert error_explicit < 3e-2 and error_sdpa < 3e-2
    assert error_explicit <= 1.5 * error_sdpa


def test_attend_takes_the_explicit_path_only_for_short_reduced_precision_on_cpu():
    q = torch.zeros(1, 1, 4, 8)
    assert not uses_explicit_attention(q, 4)  # fp32: SDPA
    assert uses_explicit_attention(q.bfloat16(), EXPLICIT_MAX_KEYS)
    assert not uses_explicit_attention(q.bfloat16(), EXPLICIT_MAX_KEYS + 1)
    assert uses_explicit_attention(q.half(), 4)
    # Either path, the same function (bf16 inputs; the long one goes through SDPA).
    for keys in (16, EXPLICIT_MAX_KEYS + 1):
        q, k, v, mask = _qkv(2, 3, keys, seed=keys)
        low = [t.bfloat16() for t in (q, k, v)]
        torch.testing.assert_close(attend(*low, mask).float(), explicit_attention(*low, mask).float(), rtol=3e-2, atol=3e-2)


def test_attention_bias_is_the_boolean_mask():
    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=4)
    x = torch.randn(3, 7, 32)
    mask = (torch.rand(3, 1, 7, 7) > 0.5) | torch.eye(7, dtype=torch.bool)
    bias = attention_bias(mask)
    assert bias.dtype == torch.float32 and bool((bias[mask] == 0).all()) and bool(bias[~mask].isneginf().all())
    assert attention_bias(bias) is bias and attention_bias(None) is None
    torch.testing.assert_close(attn(x, mask=bias), attn(x, mask=mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_float32_bias_with_queries_of_another_dtype_is_the_boolean_mask(dtype):
    # SDPA reads a float mask whose dtype is not the queries' wrongly on some CPUs (an AVX2 EPYC:
    # off by up to 3); attend casts it. A causal mask also makes the first 6 outputs those of 6 tokens.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 300, 8, dtype=dtype).unbind(0)  # 300 keys: SDPA in bf16 too
    bias = attention_bias(causal_mask(300))
    full = attend(q, k, v, bias)
    torch.testing.assert_close(full, attend(q, k, v, causal_mask(300)), rtol=0, atol=0)
    prefix = attend(q[:, :, :6], k[:, :, :6], v[:, :, :6], bias[:6, :6])
    torch.testing.assert_close(full[:, :, :6], prefix, rtol=1e-2, atol=1e-2)

def test_token_layout_round_trip_by_hand():
    keep = torch.tensor([[True, False, True], [False, True, False]])
    layout = TokenLayout.of(keep)
    assert layout.index.tolist() == [0, 2, 4] and layout.fraction == 0.5
    grid = torch.arange(6.0).reshape(2, 3, 1)
    packed = layout.pack(grid)
    assert packed.flatten().tolist() == [0.0, 2.0, 4.0]
    assert layout.unpack(packed).flatten().tolist() == [0.0, 0.0, 2.0, 0.0, 4.0, 0.0]


def test_token_layout_rounded_up_by_hand():
    """``multiple`` pads the packed tokens with the first left-out positions; unpack drops them."""
    keep = torch.tensor([[True, False, True, False], [False, True, False, False]])
    layout = TokenLayout.of(keep, multiple=2)
    assert layout.index.tolist() == [0, 2, 5, 1] and layout.count == 3 and layout.fraction == 3 / 8
    grid = torch.arange(8.0).reshape(2, 4, 1)
    assert layout.pack(grid).flatten().tolist() == [0.0, 2.0, 5.0, 1.0]
    assert torch.equal(layout.unpack(layout.pack(grid)), TokenLayout.of(keep).unpack(TokenLayout.of(keep).pack(grid)))
    assert TokenLayout.of(keep, multiple=16).index.numel() == 8  # never more than the grid
    assert TokenLayout.of(keep, multiple=3).index.tolist() == [0, 2, 5]  # already a multiple


def test_attention_over_a_token_layout_matches_the_padded_grid():
    """Kept tokens attend as on the padded grid (left-out tokens are keys no one else may see), in
    outputs and in gradients to the kept tokens and every weight."""
    torch.manual_seed(0)
    attn = SelfAttention(32, num_heads=4).double()
    attn.init_weights(std=0.2, out_std=0.2)
    x = torch.randn(3, 6, 32, dtype=torch.float64)
    keep = torch.rand(3, 6) > 0.3
    mask = (keep[:, None, None, :] | torch.eye(6, dtype=torch.bool)).expand(3, 1, 6, 6)
    rotary = RotaryEmbedding(8)(torch.arange(6).expand(3, 6), dtype=torch.float64)
    layout = TokenLayout.of(keep)

    grid_input = x.clone().requires_grad_()
    grid = attn(grid_input, rotary=rotary, mask=mask)
    (grid[keep] ** 2).sum().backward()
    grid_grads = [grid_input.grad[keep]] + [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    packed_input = layout.pack(x).requires_grad_()
    packed = attn(packed_input, rotary=rotary, mask=mask, layout=layout)
    (packed**2).sum().backward()
    torch.testing.assert_close(packed, grid[keep])
    for got, expected in zip([packed_input.grad] + [p.grad for p in attn.parameters()], grid_grads):
        torch.testing.assert_close(got, expected)
