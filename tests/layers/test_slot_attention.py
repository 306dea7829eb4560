"""Slot attention: equivariant to the order of the slots, the assignment is a softmax over slots,
padding changes nothing, frozen slots keep their state, a -inf bias takes a slot out."""

from __future__ import annotations

import torch

from polymodal.layers.slot_attention import SlotAttention

DIM = 16


def _module() -> SlotAttention:
    torch.manual_seed(0)
    module = SlotAttention(DIM, 32, num_iterations=3).double()
    module.init_weights(std=0.2)  # large enough that slots differ after a few rounds
    return module


def test_permuting_the_slots_permutes_the_outputs():
    module = _module()
    tokens = torch.randn(2, 9, DIM, dtype=torch.float64)
    slots = torch.randn(2, 5, DIM, dtype=torch.float64)
    bias = torch.tensor([0.0, -1.0, 0.5, float("-inf"), 0.0], dtype=torch.float64)
    frozen = torch.tensor([False, False, True, False, False])
    perm = torch.tensor([3, 0, 4, 1, 2])
    base = module(tokens, slots, slot_bias=bias, frozen=frozen)
    permuted = module(tokens, slots[:, perm], slot_bias=bias[perm], frozen=frozen[perm])
    torch.testing.assert_close(permuted.slots, base.slots[:, perm], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(permuted.assignment, base.assignment[:, perm], rtol=1e-12, atol=1e-12)


def test_assignment_is_a_softmax_over_slots():
    module = _module()
    tokens = torch.randn(2, 6, DIM, dtype=torch.float64)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    bias = torch.tensor([0.0, float("-inf"), 0.0], dtype=torch.float64)
    out = module(tokens, torch.randn(2, 3, DIM, dtype=torch.float64), mask=mask, slot_bias=bias)
    torch.testing.assert_close(out.assignment.sum(dim=1), mask.double())  # each real token shared out once
    assert torch.equal(out.assignment[:, 1], torch.zeros(2, 6, dtype=torch.float64))  # the -inf slot wins nothing


def test_padding_and_frozen_slots():
    module = _module()
    tokens = torch.randn(1, 5, DIM, dtype=torch.float64)
    slots = torch.randn(1, 3, DIM, dtype=torch.float64)
    alone = module(tokens, slots)
    padded = torch.cat([tokens, 100 * torch.randn(1, 3, DIM, dtype=torch.float64)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    out = module(padded, slots, mask=mask)
    torch.testing.assert_close(out.slots, alone.slots, rtol=1e-10, atol=1e-12)
    frozen = module(tokens, slots, frozen=torch.tensor([False, True, False]))
    torch.testing.assert_close(frozen.slots[:, 1], slots[:, 1], rtol=0, atol=0)
    assert not torch.allclose(frozen.slots[:, 0], slots[:, 0])
