"""The shared transformer backbone: cached vs uncached decoding, prefix-LM visibility checked through
outputs, padding invariance, skipping padded tokens vs computing them, meta-device construction,
forward_intermediates vs forward."""

from __future__ import annotations

import pytest
import torch

from polymodal.backbones import BACKBONES, BackboneIntermediates, TransformerBackbone
from polymodal.backbones import transformer
from polymodal.backbones.transformer import MIN_SKIPPED, skip_padding
from polymodal.errors import ConfigError
from polymodal.layers.moe import MoEAux
from polymodal.models.masks import causal_mask, prefix_lm_mask

DIM = 32


def _backbone(**settings) -> TransformerBackbone:
    torch.manual_seed(0)
    spec = {"name": "transformer", "num_layers": 2, "num_heads": 4, **settings}
    return BACKBONES.build(spec, DIM).double().eval()


def _layout(num_sources: int, num_targets: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    n = num_sources + num_targets
    is_target = (torch.arange(n) >= num_sources).expand(batch, n)
    return is_target, torch.ones(batch, n, dtype=torch.bool)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cache_decoding_matches_full_prefix_lm(qk_norm):
    model = _backbone(qk_norm=qk_norm)
    num_sources, num_targets, prefix = 5, 7, 7  # the prefix holds the sources and two targets
    tokens = torch.randn(2, num_sources + num_targets, DIM, dtype=torch.float64)
    mask = prefix_lm_mask(*_layout(num_sources, num_targets))
    full = model(tokens, mask=mask)

    cache = model.new_cache(2, 16, device="cpu", dtype=torch.float64)
    outs = [model(tokens[:, :prefix], mask=mask[:, :, :prefix, :prefix], cache=cache)]
    for t in range(prefix, tokens.shape[1]):
        outs.append(model(tokens[:, t : t + 1], mask=mask[:, :, t : t + 1, : t + 1], cache=cache))
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


def test_kv_cache_in_float32_and_select():
    model = _backbone().float()
    tokens = torch.randn(3, 10, DIM)
    full = model(tokens, mask=causal_mask(10))
    cache = model.new_cache(3, 10, device="cpu", dtype=torch.float32)
    first = model(tokens[:, :6], mask=causal_mask(6), cache=cache)
    cache.select(torch.tensor([2, 0]))  # drop row 1, swap the others
    rest = [model(tokens[[2, 0], t : t + 1], cache=cache) for t in range(6, 10)]
    torch.testing.assert_close(first, full[:, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(rest, dim=1), full[[2, 0], 6:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        model(tokens[[2, 0], :1], cache=cache)


def test_sources_never_see_targets_and_targets_are_causal():
    model = _backbone()
    num_sources, num_targets = 4, 5
    tokens = torch.randn(2, num_sources + num_targets, DIM, dtype=torch.float64)
    mask = prefix_lm_mask(*_layout(num_sources, num_targets))
    base = model(tokens, mask=mask)

    # Perturb the first target: sources are unchanged, every target changes.
    bumped = tokens.clone()
    bumped[:, num_sources] += torch.randn(DIM, dtype=torch.float64)
    out = model(bumped, mask=mask)
    torch.testing.assert_close(out[:, :num_sources], base[:, :num_sources], rtol=0, atol=1e-12)
    assert (out[:, num_sources:] - base[:, num_sources:]).abs().amax(dim=-1).min() > 1e-6

    # Perturb a later target: earlier targets (and sources) are unchanged, it and the later ones change.
    later = num_sources + 3
    bumped = tokens.clone()
    bumped[:, later] += torch.randn(DIM, dtype=torch.float64)
    out = model(bumped, mask=mask)
    torch.testing.assert_close(out[:, :later], base[:, :later], rtol=0, atol=1e-12)
    assert (out[:, later:] - base[:, later:]).abs().amax(dim=-1).min() > 1e-6

    # Perturb the last source: targets and the other sources all change (bidirectional over sources).
    bumped = tokens.clone()
    bumped[:, num_sources - 1] += torch.randn(DIM, dtype=torch.float64)
    out = model(bumped, mask=mask)
    assert (out - base).abs().amax(dim=-1).min() > 1e-6


def test_padding_does_not_change_unpadded_outputs():
    model = _backbone()
    n = 10
    lengths, sources = [10, 6, 3], [4, 2, 3]  # the last item has no target
    items = [torch.randn(1, length, DIM, dtype=torch.float64) for length in lengths]
    alone = []
    for item, length, num_sources in zip(items, lengths, sources):
        is_target = (torch.arange(length) >= num_sources)[None]
        alone.append(model(item, mask=prefix_lm_mask(is_target, torch.ones_like(is_target))))

    batch = torch.randn(3, n, DIM, dtype=torch.float64) * 100  # junk in the padded slots
    for i, item in enumerate(items):
        batch[i, : lengths[i]] = item[0]
    idx = torch.arange(n)
    valid = idx[None] < torch.tensor(lengths)[:, None]
    is_target = (idx[None] >= torch.tensor(sources)[:, None]) & valid
    out = model(batch, mask=prefix_lm_mask(is_target, valid))
    assert torch.isfinite(out).all()  # padded query rows attend themselves, no NaN
    for i, length in enumerate(lengths):
        torch.testing.assert_close(out[i, :length], alone[i][0], rtol=1e-10, atol=1e-10)


def _padded_prefix_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[source][target] tokens of 3 items with padded sources (junk in the padding), the prefix-LM
    mask, RoPE positions counting real tokens, and which tokens are needed (all but source padding)."""
    generator = torch.Generator().manual_seed(seed)
    num_sources, num_targets = 6, 4
    source_valid = torch.arange(num_sources)[None] < torch.tensor([6, 2, 4])[:, None]
    valid = torch.cat([source_valid, torch.ones(3, num_targets, dtype=torch.bool)], dim=1)
    is_target = (torch.arange(num_sources + num_targets) >= num_sources).expand(3, -1)
    tokens = torch.randn(3, num_sources + num_targets, DIM, generator=generator, dtype=torch.float64)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return tokens, prefix_lm_mask(is_target, valid), positions, valid | is_target


@pytest.mark.parametrize("multiple", [1, 7, 64])
def test_skipping_padding_matches_computing_it(monkeypatch, multiple: int):
    """Per-token layers over the needed tokens only give those tokens the same states and every
    weight the same gradient as the whole padded grid; skipped tokens come back as zeros. So do they
    with the packed count rounded up by a few skipped positions (``multiple`` 7: the 24 needed of 30
    become 28; 64: all 30)."""
    monkeypatch.setattr(transformer, "PACK_MULTIPLE", multiple)
    model = _backbone(qk_norm=True, bias=True).train()
    tokens, mask, positions, needed = _padded_prefix_batch()
    assert int(needed.sum()) == 24 and skip_padding(needed).index.numel() == {1: 24, 7: 28, 64: 30}[multiple]
    states = []
    for given in (None, needed):
        model.zero_grad()
        out = model(tokens, mask=mask, positions=positions, needed=given)
        (out[needed] ** 2).sum().backward()
        states.append((out, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (skipped, skipped_grads) = states
    torch.testing.assert_close(skipped[needed], full[needed], rtol=1e-10, atol=1e-10)
    assert bool((skipped[~needed] == 0).all())
    for got, expected in zip(skipped_grads, full_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_mixture_of_experts_routes_only_the_needed_tokens():
    """With a mixture of experts, padding is skipped too: without drops (padding then cannot reach a
    real token) the needed tokens get the whole grid's states and every weight its gradients; under
    capacity, padding is never routed (the records count the needed tokens only) and its content
    changes nothing."""
    moe = {"layers": [1], "num_shared_experts": 2, "num_private_experts": 1, "top_k": 2}
    tokens, mask, positions, needed = _padded_prefix_batch()
    ids = (torch.arange(tokens.shape[1]) >= 6).long().expand(3, -1)  # (B, N): sources image (0), targets text (1)
    model = _backbone(moe={**moe, "capacity_factor": None}).train()
    states = []
    for given in (None, needed):
        model.zero_grad()
        out = model(tokens, mask=mask, positions=positions, modality_ids=ids, needed=given)
        (out[needed] ** 2).sum().backward()
        states.append((out, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (skipped, skipped_grads) = states
    torch.testing.assert_close(skipped[needed], full[needed], rtol=1e-10, atol=1e-10)
    for got, expected in zip(skipped_grads, full_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    model = _backbone(moe={**moe, "capacity_factor": 1.0})
    aux = MoEAux()
    out = model(tokens, mask=mask, positions=positions, modality_ids=ids, needed=needed, aux=aux)
    (record,) = aux.records
    assert record.num_tokens == int(needed.sum()) and int(record.routed.sum()) == 2 * int(needed.sum())
    junk = torch.where(needed[..., None], tokens, 100 * torch.randn_like(tokens))  # other padding
    assert torch.equal(model(junk, mask=mask, positions=positions, modality_ids=ids, needed=needed), out)


def test_skipping_padding_applies_only_where_it_pays_and_never_with_a_cache():
    assert skip_padding(torch.ones(2, 10, dtype=torch.bool)) is None  # nothing to skip
    almost = torch.ones(2, 100, dtype=torch.bool)
    almost[0, : int(200 * MIN_SKIPPED) - 1] = False  # just under MIN_SKIPPED of the grid
    assert skip_padding(almost) is None
    almost[0, : int(200 * MIN_SKIPPED)] = False
    assert skip_padding(almost) is not None
    model = _backbone()
    tokens, mask, positions, needed = _padded_prefix_batch(seed=1)
    cache = model.new_cache(3, 10, device="cpu", dtype=torch.float64)
    cached = model(tokens, mask=mask, positions=positions, cache=cache, needed=needed)
    torch.testing.assert_close(cached, model(tokens, mask=mask, positions=positions), rtol=1e-10, atol=1e-10)


def test_builds_on_meta_then_init_weights():
    with torch.device("meta"):
        model = TransformerBackbone(64, num_layers=3, num_heads=4, qk_norm=True, bias=True)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    block = model.blocks[0]
    assert torch.equal(block.attn_norm.weight, torch.ones(64))
    assert torch.equal(block.attn.q_norm.weight, torch.ones(16))
    assert torch.equal(block.attn.q_proj.bias, torch.zeros(64))
    assert abs(block.attn.q_proj.weight.std().item() - 0.02) < 0.003
    assert block.attn.o_proj.weight.std() < block.attn.q_proj.weight.std() / 2  # depth-scaled output
    out = model(torch.randn(2, 5, 64))
    assert out.shape == (2, 5, 64) and torch.isfinite(out).all()


def test_forward_intermediates_matches_forward():
    model = _backbone()
    tokens = torch.randn(2, 6, DIM, dtype=torch.float64)
    mask = prefix_lm_mask(*_layout(3, 3))
    inter = model.forward_intermediates(tokens, mask=mask)
    assert isinstance(inter, BackboneIntermediates)
    assert len(inter.hidden) == 2 and all(h.shape == (2, 6, DIM) for h in inter.hidden)
    torch.testing.assert_close(inter.output, model(tokens, mask=mask), rtol=0, atol=0)
    torch.testing.assert_close(model.final_norm(inter.hidden[-1]), inter.output, rtol=0, atol=0)


def test_positions_shift_is_relative():
    # With RoPE and full attention, shifting every position by a constant changes nothing.
    model = _backbone()
    tokens = torch.randn(2, 6, DIM, dtype=torch.float64)
    positions = torch.arange(6).expand(2, 6)
    torch.testing.assert_close(
        model(tokens, positions=positions + 37), model(tokens, positions=positions), rtol=1e-9, atol=1e-9
    )


def test_every_parameter_gets_a_gradient_and_state_dict_round_trips():
    model = _backbone(qk_norm=True, bias=True, dropout=0.1).train()
    out = model(torch.randn(2, 5, DIM, dtype=torch.float64), mask=causal_mask(5))
    out.pow(2).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    clone = _backbone(qk_norm=True, bias=True, dropout=0.1)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_bf16_autocast_close_to_fp32():
    model = _backbone().float()
    tokens = torch.randn(2, 8, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(tokens, mask=causal_mask(8))
    high = model(tokens, mask=causal_mask(8))
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), high, rtol=0.1, atol=0.1)


def test_registry_checks_settings():
    assert "transformer" in BACKBONES
    with pytest.raises(ConfigError, match="num_layer"):
        BACKBONES.check({"name": "transformer", "num_layer": 2})
    assert _backbone(mlp_ratio=4.0).dim_hidden == 88  # 2/3 * 4 * 32 = 85.3 -> 88
