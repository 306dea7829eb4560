"""The qformer projector against a naive float64 re-implementation of its equations, SDPA against the
explicit path, key padding, invariance to the order of encoder tokens, query independence without
self-attention, and construction on meta."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polymodal.projectors import PROJECTORS
from polymodal.projectors.qformer import QFormerProjector

DIM_IN, DIM_OUT, NUM_QUERIES, NUM_HEADS = 12, 16, 5, 4


def _projector(**settings) -> QFormerProjector:
    torch.manual_seed(0)
    spec = {"name": "qformer", "num_queries": NUM_QUERIES, "num_heads": NUM_HEADS, "num_layers": 2, **settings}
    projector = PROJECTORS.build(spec, DIM_IN, DIM_OUT).double().eval()
    with torch.no_grad():  # large weights so attention is far from uniform and every branch matters
        for name, p in projector.named_parameters():
            if name != "queries":
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 2 else 0.5) + (1.0 if "norm" in name else 0.0))
    return projector


def _rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _attend(q, k, v, allowed):
    """Plain softmax attention for one item: q (Nq, D), k/v (Nk, D) split into heads by slicing."""
    hd = q.shape[-1] // NUM_HEADS
    heads, weights = [], []
    for h in range(NUM_HEADS):
        cols = slice(h * hd, (h + 1) * hd)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(hd)  # (Nq, Nk)
        w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        heads.append(w @ v[:, cols])
        weights.append(w)
    return torch.cat(heads, -1), torch.stack(weights)


def _naive_qformer(projector: QFormerProjector, tokens, mask):
    """The BLIP-2 block equations written out per item, with no library attention or einops."""
    outs, attention = [], [[] for _ in projector.blocks]
    for i in range(tokens.shape[0]):
        q = projector.queries.clone()  # (Nq, D)
        real = mask[i] if mask is not None else torch.ones(tokens.shape[1], dtype=torch.bool)
        for layer, block in enumerate(projector.blocks):
            if block.self_attn is not None:
                sa, x = block.self_attn, _rms(q, block.self_attn_norm.weight, block.self_attn_norm.eps)
                read, _ = _attend(sa.q_proj(x), sa.k_proj(x), sa.v_proj(x), torch.ones(len(q), dtype=torch.bool))
                q = q + sa.o_proj(read)
            ca = block.cross_attn
            x = _rms(q, block.cross_attn_norm.weight, block.cross_attn_norm.eps)
            c = _rms(tokens[i], block.context_norm.weight, block.context_norm.eps)
            read, w = _attend(ca.q_proj(x), ca.k_proj(c), ca.v_proj(c), real)
            attention[layer].append(w)
            q = q + ca.o_proj(read)
            x = _rms(q, block.mlp_norm.weight, block.mlp_norm.eps)
            q = q + block.mlp.fc2(F.gelu(block.mlp.fc1(x)))
        outs.append(_rms(q, projector.final_norm.weight, projector.final_norm.eps))
    return torch.stack(outs), [torch.stack(a) for a in attention]


def _padding_mask() -> torch.Tensor:
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, [0, 3]] = False
    return mask


@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_naive_equations_on_both_paths(self_attention, bias):
    projector = _projector(self_attention=self_attention, bias=bias)
    tokens = torch.randn(3, 7, DIM_IN, dtype=torch.float64)
    mask = _padding_mask()
    expected, expected_attention = _naive_qformer(projector, tokens, mask)
    fast = projector(tokens, mask)
    out = projector.forward_with_attention(tokens, mask)
    assert fast.shape == (3, NUM_QUERIES, DIM_OUT)
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(out.tokens, expected)
    assert len(out.attention) == 2
    for weights, naive in zip(out.attention, expected_attention):
        assert weights.shape == (3, NUM_HEADS, NUM_QUERIES, 7)
        torch.testing.assert_close(weights, naive)
        torch.testing.assert_close(weights.sum(-1), torch.ones(3, NUM_HEADS, NUM_QUERIES, dtype=torch.float64))
        assert (weights.masked_select(~mask[:, None, None, :]) == 0).all()
    assert out.attention[0].std() > 0.05  # attention is not uniform, so the comparison has teeth


def test_padding_does_not_change_an_item():
    projector = _projector()
    item = torch.randn(1, 4, DIM_IN, dtype=torch.float64)
    alone = projector(item)
    padded = torch.cat([item, 1e3 * torch.randn(1, 3, DIM_IN, dtype=torch.float64)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 7, DIM_IN, dtype=torch.float64)])  # (2, 7, DIM_IN)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    torch.testing.assert_close(projector(batch, mask)[:1], alone)
    out = projector.forward_with_attention(batch, mask)
    torch.testing.assert_close(out.tokens[:1], alone)
    for weights in out.attention:
        assert (weights[0, ..., 4:] == 0).all() and (weights[0, ..., :4] > 0).all()


def test_permuting_encoder_tokens_leaves_the_output_unchanged():
    projector = _projector()
    tokens = torch.randn(3, 7, DIM_IN, dtype=torch.float64)
    mask = _padding_mask()
    reference = projector.forward_with_attention(tokens, mask)
    perm = torch.randperm(7)
    permuted = projector.forward_with_attention(tokens[:, perm], mask[:, perm])
    torch.testing.assert_close(permuted.tokens, reference.tokens)
    for after, before in zip(permuted.attention, reference.attention):
        torch.testing.assert_close(after, before[..., perm])


@pytest.mark.parametrize("self_attention", [False, True])
def test_queries_read_each_other_only_through_self_attention(self_attention):
    """Without self-attention each query's output depends on that query alone: editing query 0
    leaves the others untouched and reordering the queries reorders the outputs. With it, not so."""
    projector = _projector(self_attention=self_attention)
    tokens = torch.randn(2, 7, DIM_IN, dtype=torch.float64)
    before = projector(tokens)
    with torch.no_grad():
        projector.queries[0] += 1.0
    after = projector(tokens)
    assert not torch.allclose(after[:, 0], before[:, 0])
    if self_attention:
        assert not torch.allclose(after[:, 1:], before[:, 1:])
        return
    torch.testing.assert_close(after[:, 1:], before[:, 1:])
    perm = torch.randperm(NUM_QUERIES)
    with torch.no_grad():
        projector.queries.copy_(projector.queries[perm])
    torch.testing.assert_close(projector(tokens), after[:, perm])


def test_identical_encoder_tokens_make_the_cross_attention_scores_irrelevant():
    """If every encoder token is the same vector, any convex combination of their values is that one
    value, so the cross-attention query/key projections cannot affect the output."""
    projector = _projector(num_layers=1, self_attention=False)
    tokens = torch.randn(2, 1, DIM_IN, dtype=torch.float64).expand(2, 6, DIM_IN)
    before = projector(tokens)
    with torch.no_grad():
        projector.blocks[0].cross_attn.q_proj.weight.normal_()
        projector.blocks[0].cross_attn.k_proj.weight.normal_()
    torch.testing.assert_close(projector(tokens), before)
    with torch.no_grad():  # control: the value projection does matter
        projector.blocks[0].cross_attn.v_proj.weight.normal_()
    assert not torch.allclose(projector(tokens), before)


def test_builds_on_meta_and_settings_shape_the_parameters():
    settings = {"name": "qformer", "num_queries": 8, "num_layers": 3, "num_heads": 2, "mlp_ratio": 2.0}
    with torch.device("meta"):
        meta = PROJECTORS.build({**settings, "self_attention": False}, 24, 32)
        out = meta(torch.randn(2, 11, 24), torch.ones(2, 11, dtype=torch.bool))
    assert all(p.is_meta for p in meta.parameters())
    assert out.shape == (2, 8, 32) and out.is_meta
    real = PROJECTORS.build({**settings, "self_attention": False}, 24, 32)
    shapes = {n: p.shape for n, p in real.named_parameters()}
    assert {n: p.shape for n, p in meta.named_parameters()} == shapes
    assert len(real.blocks) == 3 and not any("self_attn" in n for n in shapes)
    assert shapes["blocks.0.mlp.fc1.weight"] == (64, 32) and shapes["blocks.0.cross_attn.k_proj.weight"] == (32, 24)
    with_self = PROJECTORS.build(settings, 24, 32)
    assert "blocks.2.self_attn.q_proj.weight" in dict(with_self.named_parameters())
