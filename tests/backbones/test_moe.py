"""The modality-aware mixture of experts: grouped dispatch against every expert on every token,
capacity drops against a loop over the priority rule, the auxiliary losses against their formulas,
private experts checked through outputs, and the MoE backbone (cached decoding, aux collection,
config errors, the fp32 router under autocast)."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.backbones import BACKBONES
from polymodal.errors import ConfigError
from polymodal.layers.moe import MODALITIES, NO_MODALITY, ModalityMoE, MoEAux, _run_padded
from polymodal.losses.moe import load_balancing_loss, router_z_loss
from polymodal.modality import MODALITY_INDEX
from polymodal.models.masks import causal_mask
from polymodal.modality import Modality

DIM = 16
HIDDEN = 24


def _moe(**settings) -> ModalityMoE:
    torch.manual_seed(0)
    moe = ModalityMoE(DIM, HIDDEN, **settings).double()
    moe.init_weights(std=0.3, out_std=0.3)  # large weights: routing far from uniform, outputs far from zero
    return moe


def _dense_reference(moe: ModalityMoE, tokens: torch.Tensor, expert: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the gates the router chose (zero elsewhere)."""
    every = torch.stack([e(tokens) for e in moe.experts], dim=1)  # (T, E, D)
    weights = torch.zeros(tokens.shape[0], moe.num_experts, dtype=tokens.dtype).scatter_add(1, expert, gates.to(tokens.dtype))
    return (every * weights[:, :, None]).sum(dim=1)


def _ids(num_tokens: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(NO_MODALITY, len(MODALITIES), (num_tokens,), generator=generator)


@pytest.mark.parametrize(("top_k", "private"), [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_grouped_dispatch_equals_dense_computation(top_k, private):
    moe = _moe(num_shared_experts=4, num_private_experts=private, top_k=top_k, capacity_factor=100.0)
    tokens = torch.randn(40, DIM, dtype=torch.float64, requires_grad=True)
    ids = _ids(40)
    out = moe(tokens, modality_ids=ids)
    rows = moe.modality_rows(ids, tokens)
    routing = moe.route(tokens, rows)
    reference = _dense_reference(moe, tokens, routing.expert, routing.gates)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    if top_k > 1:
        torch.testing.assert_close(routing.gates.sum(dim=1), torch.ones(40, dtype=torch.float64))

    # Gradients agree too (to the tokens and to every expert and the router).
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [tokens, *moe.parameters()], allow_unused=True)
    routing = moe.route(tokens, rows)
    reference = _dense_reference(moe, tokens, routing.expert, routing.gates)
    ref_grads = torch.autograd.grad((reference * weights).sum(), [tokens, *moe.parameters()], allow_unused=True)
    for ours, theirs in zip(grads, ref_grads):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rows", [0, 1, 7, 8, 9, 23])
def test_an_expert_on_a_padded_slice_equals_it_on_the_slice(rows):
    """The slice padded with zero rows to a multiple (8 here, 64 in use) gives the same rows and
    the same gradients as the slice alone, at every remainder and at an exact multiple."""
    expert = _moe(num_shared_experts=2, top_k=1).experts[0]
    part = torch.randn(rows, DIM, dtype=torch.float64, requires_grad=True)
    padded = _run_padded(expert, part, multiple=8)
    plain = expert(part)
    assert padded.shape == (rows, DIM)
    torch.testing.assert_close(padded, plain, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(plain)
    ours = torch.autograd.grad((padded * weights).sum(), [part, *expert.parameters()])
    theirs = torch.autograd.grad((plain * weights).sum(), [part, *expert.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _drop_reference(expert: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """(T, k) kept: first choices of all tokens in token order, then second choices, ..., each
    expert accepting assignments until its capacity is full."""
    num_tokens, top_k = expert.shape
    filled = [0] * capacity.numel()
    kept = torch.zeros(num_tokens, top_k, dtype=torch.bool)
    for j in range(top_k):
        for t in range(num_tokens):
            e = int(expert[t, j])
            if filled[e] < capacity[e]:
                filled[e] += 1
                kept[t, j] = True
    return kept


@pytest.mark.parametrize(("top_k", "private", "factor"), [(1, 0, 0.5), (2, 0, 0.7), (2, 1, 1.0)])
def test_capacity_drops_follow_the_priority_rule_and_are_counted(top_k, private, factor):
    moe = _moe(num_shared_experts=3, num_private_experts=private, top_k=top_k, capacity_factor=factor)
    tokens = torch.randn(30, DIM, dtype=torch.float64)
    ids = _ids(30, seed=2)
    aux = MoEAux()
    out = moe(tokens, modality_ids=ids, aux=aux)
    rows = moe.modality_rows(ids, tokens)
    routing = moe.route(tokens, rows)
    kept = _drop_reference(routing.expert, moe.capacity(rows))
    assert 0 < (~kept).sum() < kept.numel()  # this capacity drops some assignments, not all

    # Dropped assignments contribute nothing: the dense reference with their gates zeroed.
    reference = _dense_reference(moe, tokens, routing.expert, routing.gates * kept)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)

    record = aux.records[0]
    assert record.routed.sum() == 30 * top_k
    assert record.kept.sum() == kept.sum()
    assert record.dropped_tokens == (~kept.any(dim=1)).sum()
    stats = aux.stats()
    assert stats["moe_dropped_fraction"] == pytest.approx((~kept).sum().item() / kept.numel())
    assert stats["moe_dropped_tokens"] == pytest.approx((~kept.any(dim=1)).sum().item() / 30)


def test_capacity_by_hand():
    # Two shared experts, top-1, eight tokens: uniform load 4 each, factor 0.5 -> capacity 2.
    moe = _moe(num_shared_experts=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with a positive first feature picks expert 0
    tokens = torch.randn(8, DIM, dtype=torch.float64)
    tokens[:, 0] = torch.arange(1, 9)
    aux = MoEAux()
    out = moe(tokens, aux=aux)
    assert moe.capacity(torch.full((8,), len(MODALITIES))).tolist() == [2, 2]
    expected = moe.experts[0](tokens[:2]) * moe.route(tokens[:2], torch.full((2,), 3)).gates
    torch.testing.assert_close(out[:2], expected)
    assert torch.equal(out[2:], torch.zeros(6, DIM, dtype=torch.float64))  # tokens 2..7 dropped
    assert aux.records[0].dropped_tokens == 6
    assert aux.stats()["moe_dropped_fraction"] == pytest.approx(0.75)


def test_load_balancing_loss_equals_its_formula():
    generator = torch.Generator().manual_seed(3)
    probs = torch.randn(50, 6, generator=generator).softmax(dim=-1)
    expert = probs.topk(2, dim=-1).indices
    f = [sum(int(e) == i for e in expert.reshape(-1)) / expert.numel() for i in range(6)]
    p = [probs[:, i].mean().item() for i in range(6)]
    assert load_balancing_loss(probs, expert).item() == pytest.approx(6 * sum(fi * pi for fi, pi in zip(f, p)))
    # Uniform routing scores exactly one; everything on one expert scores E times its probability mass.
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balancing_loss(uniform, torch.arange(3).repeat(2)[:, None]).item() == pytest.approx(1.0)
    assert load_balancing_loss(uniform, torch.zeros(6, 1, dtype=torch.long)).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]]).expand(6, 3)
    assert load_balancing_loss(collapsed, torch.zeros(6, 1, dtype=torch.long)).item() == pytest.approx(3.0)


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), float("-inf")]])
    # rows: logsumexp = log 2 and log 3
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(3) ** 2) / 2)


def test_layer_losses_match_the_loss_functions():
    moe = _moe(num_shared_experts=2, num_private_experts=1, top_k=2, capacity_factor=None)
    tokens = torch.randn(20, DIM, dtype=torch.float64)
    ids = _ids(20, seed=4)
    aux = MoEAux()
    moe(tokens, modality_ids=ids, aux=aux)
    moe(tokens[:7], modality_ids=ids[:7], aux=aux)
    routing = moe.route(tokens, moe.modality_rows(ids, tokens))
    assert torch.allclose(aux.records[0].load_balance, load_balancing_loss(routing.probs, routing.expert))
    assert torch.allclose(aux.records[0].router_z, router_z_loss(routing.logits))
    losses = aux.losses()
    expected = (aux.records[0].load_balance + aux.records[1].load_balance) / 2
    torch.testing.assert_close(losses["moe_load_balance"], expected)
    assert set(losses) == {"moe_load_balance", "moe_router_z"}


def test_private_experts_never_receive_another_modality():
    moe = _moe(num_shared_experts=2, num_private_experts=2, top_k=2, capacity_factor=None)
    tokens = torch.randn(60, DIM, dtype=torch.float64)
    ids = _ids(60, seed=5)
    aux = MoEAux()
    base = moe(tokens, modality_ids=ids, aux=aux)
    routed = aux.records[0].routed  # (M + 1, E)
    for i, modality in enumerate(MODALITIES):
        private = range(2 + 2 * i, 4 + 2 * i)
        others = [r for r in range(len(MODALITIES) + 1) if r != i]
        assert routed[others][:, list(private)].sum() == 0, f"{modality} private experts got foreign tokens"
        assert routed[i, list(private)].sum() > 0  # and they are used by their own modality

    # Through outputs: scrambling the text experts changes text tokens only.
    text = MODALITY_INDEX[Modality.TEXT]
    with torch.no_grad():
        for e in (2 + 2 * text, 3 + 2 * text):
            moe.experts[e].down_proj.weight.mul_(-3.0)
    out = moe(tokens, modality_ids=ids)
    is_text = ids == text
    torch.testing.assert_close(out[~is_text], base[~is_text], rtol=0, atol=0)
    assert (out[is_text] - base[is_text]).abs().amax(dim=-1).min() > 0


def test_modality_order_matches_modality_index():
    assert {m: i for i, m in enumerate(MODALITIES)} == MODALITY_INDEX


def _moe_backbone(**moe) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = {"layers": [0, 2], "num_shared_experts": 3, "num_private_experts": 1, "top_k": 2, **moe}
    return BACKBONES.build({"name": "transformer", "num_layers": 3, "num_heads": 4, "moe": spec}, 32).double().eval()


def test_moe_backbone_cached_decoding_matches_full_and_collects_aux():
    model = _moe_backbone(capacity_factor=None)  # capacity depends on how many tokens a call sees
    tokens = torch.randn(2, 10, 32, dtype=torch.float64)
    ids = torch.randint(NO_MODALITY, 3, (2, 10))
    aux = MoEAux()
    full = model(tokens, mask=causal_mask(10), modality_ids=ids, aux=aux)
    assert [r.layer for r in aux.records] == [0, 2]
    assert isinstance(model.blocks[1].mlp, torch.nn.Module) and not hasattr(model.blocks[1].mlp, "router")
    cache = model.new_cache(2, 10, device="cpu", dtype=torch.float64)
    outs = [model(tokens[:, :6], mask=causal_mask(6), cache=cache, modality_ids=ids[:, :6])]
    for t in range(6, 10):
        outs.append(model(tokens[:, t : t + 1], mask=None, cache=cache, modality_ids=ids[:, t : t + 1]))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    # forward_intermediates agrees, and the modality ids matter.
    inter = model.forward_intermediates(tokens, mask=causal_mask(10), modality_ids=ids)
    torch.testing.assert_close(inter.output, full, rtol=0, atol=0)
    assert not torch.allclose(model(tokens, mask=causal_mask(10)), full)


def test_router_is_fp32_under_bf16_autocast():
    moe = ModalityMoE(DIM, HIDDEN, num_shared_experts=4, top_k=2)
    tokens = torch.randn(12, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.route(tokens.bfloat16(), torch.full((12,), 3))
        out = moe(tokens)
    assert routing.logits.dtype == routing.probs.dtype == routing.gates.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_bad_modality_ids_and_settings_fail_clearly():
    moe = ModalityMoE(DIM, HIDDEN)
    with pytest.raises(ValueError, match="modality_ids must have shape"):
        moe(torch.randn(2, 5, DIM), modality_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        moe(torch.randn(2, 5, DIM), modality_ids=torch.full((2, 5), 3))
    for moe_spec, message in [
        ({"layers": [4]}, r"moe.layers: expected a non-empty list of block indices in \[0, 4\)"),
        ({"layers": [0], "top_k": 5}, "moe.top_k: 5 exceeds num_shared_experts 4"),
        ({"layers": [0], "num_expert": 5}, "moe.num_expert: unknown setting; valid: layers, num_shared_experts"),
        ({"layers": [0], "capacity_factor": 0}, "moe.capacity_factor: expected a number > 0 or null"),
        ({"layers": [0], "num_private_experts": -1}, "moe.num_private_experts: expected an integer >= 0"),
        ([0, 1], "moe: expected a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            BACKBONES.check({"name": "transformer", "moe": moe_spec}, where="model.backbone")
    BACKBONES.check({"name": "transformer", "moe": {"layers": [1, 3], "capacity_factor": None}})
