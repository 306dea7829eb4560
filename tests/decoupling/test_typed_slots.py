"""Typed slots: equivariant to slot order within a type, leakage computed from the module's own
assignment equals a hand-written sum, the shared slots stay closed then open, gradients reach
the leakage loss."""

from __future__ import annotations

import pytest
import torch

from polymodal.decoupling import DECOUPLERS
from polymodal.modality import Modality
from polymodal.modality import MODALITY_INDEX

DIM = 16
MODALITIES = (Modality.IMAGE, Modality.TEXT)
PRIVATE, SHARED = 3, 2


def _slots(**settings):
    torch.manual_seed(0)
    spec = {"name": "typed_slots", "num_private_slots": PRIVATE, "num_shared_slots": SHARED, **settings}
    return DECOUPLERS.build(spec, DIM, MODALITIES).double()


def _inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(2)
    states = {Modality.IMAGE: torch.randn(batch, 6, DIM, generator=generator, dtype=torch.float64),
              Modality.TEXT: torch.randn(batch, 4, DIM, generator=generator, dtype=torch.float64)}
    masks = {m: torch.ones(batch, s.shape[1], dtype=torch.bool) for m, s in states.items()}
    masks[Modality.TEXT][1, 3:] = False
    masks[Modality.IMAGE][2] = False  # item 2 has no image
    return states, masks


def test_permuting_slots_within_a_type_permutes_outputs():
    module = _slots()
    module.set_progress(1.0)
    states, masks = _inputs()
    base = module(states, masks)
    perm = torch.tensor([2, 0, 1, 4, 5, 3, 7, 6])  # within types: image slots 0-2, text 3-5, shared 6-7
    with torch.no_grad():
        module.slots.copy_(module.slots[perm])
    out = module(states, masks)
    for name, tokens in base.token_sets.items():
        local = {"private_image": [2, 0, 1], "private_text": [1, 2, 0], "shared_image": [1, 0], "shared_text": [1, 0]}[name]
        torch.testing.assert_close(out.token_sets[name], tokens[:, local], rtol=1e-10, atol=1e-12)
    for m in MODALITIES:  # summaries are means over a type's slots: unchanged
        torch.testing.assert_close(out.pooled[m], base.pooled[m], rtol=1e-10, atol=1e-12)
    assert out.stats["leakage_image"] == pytest.approx(base.stats["leakage_image"], rel=1e-10)


def test_leakage_equals_a_hand_computation_on_the_assignment():
    module = _slots()
    module.set_progress(1.0)
    states, masks = _inputs()
    out = module(states, masks)
    assignment = out.attention["slots"].weights  # (B, S, N_img + N_txt), padded to the widest modality
    width = 6
    image_keys, text_keys = slice(0, width), slice(width, width + 4)
    holds_image = masks[Modality.IMAGE].any(dim=1)
    image_slots, text_slots = slice(0, PRIVATE), slice(PRIVATE, 2 * PRIVATE)
    # Image slots, items holding image: the mass won on text tokens over all mass won on real tokens.
    on_text = (assignment[holds_image][:, image_slots, text_keys] * masks[Modality.TEXT][holds_image][:, None, :4]).sum()
    on_image = (assignment[holds_image][:, image_slots, image_keys] * masks[Modality.IMAGE][holds_image][:, None]).sum()
    assert out.stats["leakage_image"] == pytest.approx((on_text / (on_text + on_image)).item(), rel=1e-10)
    foreign = (assignment[:, text_slots, image_keys] * masks[Modality.IMAGE][:, None]).sum()
    own = (assignment[:, text_slots, text_keys] * masks[Modality.TEXT][:, None, :4]).sum()
    assert out.stats["leakage_text"] == pytest.approx((foreign / (foreign + own)).item(), rel=1e-10)
    assert 0.05 < out.stats["leakage_image"] < 0.95  # a real, non-trivial quantity
    mean = (out.stats["leakage_image"] + out.stats["leakage_text"]) / 2
    torch.testing.assert_close(out.losses["leakage"], torch.tensor(mean, dtype=torch.float64))
    # Each real token's assignment over all slots sums to one; padding gets none.
    key_real = out.attention["slots"].key_modality >= 0
    torch.testing.assert_close(assignment.sum(dim=1), key_real.double())
    assert out.attention["slots"].key_modality[0, 0] == MODALITY_INDEX[Modality.IMAGE]


def test_shared_slots_are_closed_in_the_private_phase():
    module = _slots(open_start=0.3, open_end=0.6)
    states, masks = _inputs()
    module.set_progress(0.1)
    out = module(states, masks)
    shared = module.slot_type(torch.device("cpu")) == -1
    won = out.attention["slots"].weights[:, shared]  # (B, S_shared, N)
    assert torch.equal(won, torch.zeros_like(won))
    initial = module.initial_slots()[shared]
    torch.testing.assert_close(out.token_sets["shared_text"], initial.expand(4, -1, -1), rtol=0, atol=0)
    assert not out.shared[Modality.TEXT].requires_grad
    torch.testing.assert_close(out.pooled[Modality.TEXT], module.out_norm(out.private[Modality.TEXT]))
    module.set_progress(0.45)
    half = module(states, masks)
    assert half.stats["gate"] == pytest.approx(0.5)
    assert half.attention["slots"].weights[:, shared].sum() > 0
    module.set_progress(1.0)
    full = module(states, masks)
    # Opening further gives the shared slots a larger share of the tokens.
    assert full.attention["slots"].weights[:, shared].sum() > half.attention["slots"].weights[:, shared].sum()


def test_leakage_loss_trains_the_slots():
    module = _slots()
    module.set_progress(1.0)
    states, masks = _inputs()
    module(states, masks).losses["leakage"].backward()
    assert module.slots.grad is not None and module.slots.grad.abs().sum() > 0
    assert module.slot_attention.q_proj.weight.grad.abs().sum() > 0
