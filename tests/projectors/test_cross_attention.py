"""CrossAttention layer and the cross_attention projector: SDPA path against an explicit softmax and a
naive per-head loop, key padding, invariance to the order (and duplication) of encoder tokens, a
hand-computed uniform-attention case, and construction on meta."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.layers import attention
from polymodal.layers.cross_attention import CrossAttention
from polymodal.projectors import PROJECTORS
from polymodal.projectors.cross_attention import CrossAttentionProjector

DIM_IN, DIM_OUT = 12, 16


def _naive_cross_attention(attn: CrossAttention, queries, context, mask):
    """Loops over batch items and heads with an explicit softmax; no SDPA, no einops, no qk-norm."""
    b, nq, d = queries.shape
    hd = attn.head_dim
    q_all, k_all, v_all = attn.q_proj(queries), attn.k_proj(context), attn.v_proj(context)
    outs, weights = [], []
    for i in range(b):
        real = mask[i] if mask is not None else torch.ones(context.shape[1], dtype=torch.bool)
        heads, head_weights = [], []
        for h in range(attn.num_heads):
            cols = slice(h * hd, (h + 1) * hd)
            q, k, v = q_all[i, :, cols], k_all[i][real][:, cols], v_all[i][real][:, cols]
            w_real = torch.softmax(q @ k.T / math.sqrt(hd), dim=-1)  # (Nq, N_real)
            w = torch.zeros(nq, context.shape[1], dtype=queries.dtype)
            w[:, real] = w_real
            heads.append(w_real @ v)
            head_weights.append(w)
        outs.append(attn.o_proj(torch.cat(heads, dim=-1)))
        weights.append(torch.stack(head_weights))
    return torch.stack(outs), torch.stack(weights)


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False  # padding need not be at the end
    mask[2, 5] = False
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_layer_sdpa_matches_explicit_and_naive(masked):
    torch.manual_seed(0)
    attn = CrossAttention(DIM_OUT, DIM_IN, num_heads=4, bias=True).double()
    attn.init_weights(std=0.3, out_std=0.3)  # large weights so attention is far from uniform
    queries = torch.randn(3, 5, DIM_OUT, dtype=torch.float64)
    context = torch.randn(3, 7, DIM_IN, dtype=torch.float64)
    mask = _padding_mask() if masked else None

    fast = attn(queries, context, mask=mask)
    explicit = attn.forward_with_weights(queries, context, mask=mask)
    naive_tokens, naive_weights = _naive_cross_attention(attn, queries, context, mask)

    torch.testing.assert_close(fast, explicit.tokens)
    torch.testing.assert_close(explicit.tokens, naive_tokens)
    torch.testing.assert_close(explicit.weights, naive_weights)
    assert explicit.weights.shape == (3, 4, 5, 7)
    torch.testing.assert_close(explicit.weights.sum(-1), torch.ones(3, 4, 5, dtype=torch.float64))
    assert explicit.weights.std() > 0.05  # not the uniform case, so the comparison means something
    if masked:
        # 6 padded keys, each seen by 4 heads x 5 queries
        padded = explicit.weights.masked_select(~mask[:, None, None, :])
        assert padded.numel() == 6 * 4 * 5 and (padded == 0).all()


def test_layer_gradients_agree_between_paths():
    torch.manual_seed(0)
    attn = CrossAttention(DIM_OUT, DIM_IN, num_heads=2, qk_norm=True).double()
    attn.init_weights(std=0.3, out_std=0.3)
    queries = torch.randn(3, 4, DIM_OUT, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, 7, DIM_IN, dtype=torch.float64, requires_grad=True)
    mask = _padding_mask()
    target = torch.randn(3, 4, DIM_OUT, dtype=torch.float64)
    grads = []
    for forward in (attn, lambda q, c, mask: attn.forward_with_weights(q, c, mask=mask).tokens):
        loss = (forward(queries, context, mask=mask) * target).sum()
        grads.append(torch.autograd.grad(loss, (queries, context, attn.k_proj.weight)))
    for fast, explicit in zip(*grads):
        torch.testing.assert_close(fast, explicit)
    assert torch.equal(grads[0][1][1, 4:], torch.zeros(3, DIM_IN, dtype=torch.float64))  # padding gets no gradient


def test_bf16_layer_on_the_explicit_kernel_is_close_to_float64_with_its_gradients(monkeypatch):
    """In bf16 on a CPU ``forward`` takes the explicit fp32 kernel (``attend``); its outputs and
    gradients stay within bf16 rounding of the float64 layer's, padding and an item with no real
    key included."""
    torch.manual_seed(0)
    reference = CrossAttention(DIM_OUT, DIM_IN, num_heads=4, bias=True).double()
    reference.init_weights(std=0.3, out_std=0.3)
    low = CrossAttention(DIM_OUT, DIM_IN, num_heads=4, bias=True).to(torch.bfloat16)
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
    reference.load_state_dict({k: v.double() for k, v in low.state_dict().items()})  # the same rounded weights
    queries = torch.randn(3, 5, DIM_OUT, dtype=torch.bfloat16)
    context = torch.randn(3, 7, DIM_IN, dtype=torch.bfloat16)
    mask = _padding_mask()
    mask[0] = False  # an item with no real key
    q_low, c_low = queries.clone().requires_grad_(), context.clone().requires_grad_()
    q_ref, c_ref = queries.double().requires_grad_(), context.double().requires_grad_()
    calls = []
    explicit = attention.explicit_attention
    monkeypatch.setattr(attention, "explicit_attention", lambda *a, **k: calls.append(a[0].dtype) or explicit(*a, **k))
    out_low, out_ref = low(q_low, c_low, mask=mask), reference(q_ref, c_ref, mask=mask)
    assert calls == [torch.bfloat16]  # the bf16 layer took the explicit kernel, the float64 one SDPA
    torch.testing.assert_close(out_low.double(), out_ref, atol=0.03, rtol=0.03)
    assert torch.equal(out_low[0], low.o_proj.bias.expand(5, -1))  # the empty item: nothing but the bias
    target = torch.randn(3, 5, DIM_OUT, dtype=torch.float64)
    (out_low.double() * target).sum().backward()
    (out_ref * target).sum().backward()
    for ours, exact in ((q_low.grad, q_ref.grad), (c_low.grad, c_ref.grad)):
        torch.testing.assert_close(ours.double(), exact, atol=0.05, rtol=0.05)


def test_item_without_real_tokens_contributes_nothing_and_stays_finite():
    torch.manual_seed(0)
    attn = CrossAttention(DIM_OUT, DIM_IN, num_heads=4).double()
    attn.init_weights(std=0.3, out_std=0.3)
    queries = torch.randn(2, 3, DIM_OUT, dtype=torch.float64)
    context = torch.randn(2, 4, DIM_IN, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    fast = attn(queries, context, mask=mask)
    explicit = attn.forward_with_weights(queries, context, mask=mask)
    assert torch.equal(explicit.weights[1], torch.zeros(4, 3, 4, dtype=torch.float64))
    assert torch.equal(fast[1], torch.zeros(3, DIM_OUT, dtype=torch.float64))  # no bias: o_proj(0) = 0
    torch.testing.assert_close(fast, explicit.tokens)
    (grad,) = torch.autograd.grad(fast.sum(), context)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(4, DIM_IN, dtype=torch.float64))


def test_layer_rejects_a_mask_of_the_wrong_shape():
    attn = CrossAttention(DIM_OUT, DIM_IN)
    with pytest.raises(ValueError, match="mask must be bool"):
        attn(torch.randn(2, 3, DIM_OUT), torch.randn(2, 4, DIM_IN), mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        attn(torch.randn(2, 3, DIM_OUT), torch.randn(2, 4, DIM_IN), mask=torch.ones(2, 4))


def _projector(**settings) -> CrossAttentionProjector:
    torch.manual_seed(0)
    projector = PROJECTORS.build({"name": "cross_attention", "num_queries": 6, **settings}, DIM_IN, DIM_OUT)
    projector.double().eval()
    projector.attn.init_weights(std=0.3, out_std=0.3)
    return projector


def test_projector_fast_path_matches_forward_with_attention():
    projector = _projector(num_heads=2)
    tokens = torch.randn(3, 7, DIM_IN, dtype=torch.float64)
    mask = _padding_mask()
    out = projector.forward_with_attention(tokens, mask)
    fast = projector(tokens, mask)
    assert fast.shape == (3, 6, DIM_OUT)
    torch.testing.assert_close(fast, out.tokens)
    assert len(out.attention) == 1 and out.attention[0].shape == (3, 2, 6, 7)
    torch.testing.assert_close(out.attention[0].sum(-1), torch.ones(3, 2, 6, dtype=torch.float64))


def test_padding_gets_zero_attention_and_does_not_change_an_item():
    projector = _projector()
    item = torch.randn(1, 3, DIM_IN, dtype=torch.float64)
    alone = projector(item)
    padded = torch.cat([item, 1e3 * torch.randn(1, 4, DIM_IN, dtype=torch.float64)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 7, DIM_IN, dtype=torch.float64)])  # (2, 7, DIM_IN)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 3:] = False
    torch.testing.assert_close(projector(batch, mask)[:1], alone)
    out = projector.forward_with_attention(batch, mask)
    torch.testing.assert_close(out.tokens[:1], alone)
    assert torch.equal(out.attention[0][0, :, :, 3:], torch.zeros_like(out.attention[0][0, :, :, 3:]))
    assert (out.attention[0][0, :, :, :3] > 0).all()


def test_permuting_or_duplicating_encoder_tokens_leaves_the_output_unchanged():
    projector = _projector()
    tokens = torch.randn(3, 7, DIM_IN, dtype=torch.float64)
    mask = _padding_mask()
    reference = projector.forward_with_attention(tokens, mask)
    perm = torch.randperm(7)
    permuted = projector.forward_with_attention(tokens[:, perm], mask[:, perm])
    torch.testing.assert_close(permuted.tokens, reference.tokens)
    torch.testing.assert_close(permuted.attention[0], reference.attention[0][..., perm])  # weights follow their token
    # Softmax attention sees a set with multiplicities: every token twice is the same set, each weight halved.
    doubled = projector.forward_with_attention(torch.cat([tokens, tokens], 1), torch.cat([mask, mask], 1))
    torch.testing.assert_close(doubled.tokens, reference.tokens)
    torch.testing.assert_close(doubled.attention[0][..., :7] * 2, reference.attention[0])


def test_zero_keys_give_mean_pooling_of_the_real_tokens():
    """With k_proj = 0 every score is equal, so each query averages the real tokens' values."""
    projector = _projector(bias=False)
    with torch.no_grad():
        projector.attn.k_proj.weight.zero_()
    tokens = torch.randn(3, 7, DIM_IN, dtype=torch.float64)
    mask = _padding_mask()
    normed = tokens / torch.sqrt(tokens.pow(2).mean(-1, keepdim=True) + projector.context_norm.eps)
    mean = (normed * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, DIM_IN)
    pooled = mean @ projector.attn.v_proj.weight.T @ projector.attn.o_proj.weight.T  # (B, DIM_OUT)
    expected = pooled / torch.sqrt(pooled.pow(2).mean(-1, keepdim=True) + projector.out_norm.eps)
    out = projector(tokens, mask)
    torch.testing.assert_close(out, expected[:, None].expand(3, 6, DIM_OUT))


def test_builds_on_meta_with_settings():
    settings = {"name": "cross_attention", "num_queries": 9, "num_heads": 8, "qk_norm": True, "bias": False}
    with torch.device("meta"):
        meta = PROJECTORS.build(settings, 24, 64)
        out = meta(torch.randn(2, 11, 24), torch.ones(2, 11, dtype=torch.bool))
    assert all(p.is_meta for p in meta.parameters())
    assert out.shape == (2, 9, 64) and out.is_meta
    real = PROJECTORS.build(settings, 24, 64)
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert {"attn.q_norm.weight", "attn.k_norm.weight"} <= dict(real.named_parameters()).keys()
    assert real.attn.q_proj.bias is None and real.queries.shape == (9, 64)
