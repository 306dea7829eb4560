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


def _plain_rounds(module: SlotAttention, tokens, slots, mask, bias, frozen):
    """Algorithm 1 written out with ``nn.GRUCell`` and per-item slots: the reference of the fast paths."""
    normed = module.input_norm(tokens)
    keys, values = module.k_proj(normed), module.v_proj(normed)
    initial, (batch, num_slots, dim) = slots, slots.shape
    for _ in range(module.num_iterations):
        logits = torch.einsum("bsd,bnd->bsn", module.q_proj(module.slot_norm(slots)), keys) * module.scale + bias[None, :, None]
        assignment = logits.softmax(dim=1) * mask[:, None, :].double()
        updates = assignment / (assignment.sum(dim=-1, keepdim=True) + 1e-8) @ values
        updated = module.gru(updates.reshape(-1, dim), slots.reshape(-1, dim)).view(batch, num_slots, dim)
        slots = torch.where(frozen[:, None], initial, updated + module.mlp(module.mlp_norm(updated)))
    return slots, assignment


def test_shared_initial_slots_and_needed_slots_equal_the_plain_rounds():
    """(S, D) initial slots shared by every item, and the skipped last update of slots nobody reads,
    give the reference's outputs and gradients (forward in float64, to rounding)."""
    module = _module()
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(3, 7, DIM, dtype=torch.float64, generator=generator)
    initial = torch.randn(4, DIM, dtype=torch.float64, generator=generator, requires_grad=True)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2, [True] * 3 + [False] * 4])
    bias = torch.tensor([0.0, -0.5, 0.3, 0.0], dtype=torch.float64)
    frozen = torch.tensor([False, False, False, True])
    needed = torch.tensor([[True, False, True, True], [False, True, False, False], [True, True, True, True]])
    probe = torch.randn(3, 4, DIM, dtype=torch.float64, generator=generator)  # a loss that reads every output

    def gradients(loss):
        return torch.autograd.grad(loss, [initial, *module.parameters()])

    slots, assignment = _plain_rounds(module, tokens, initial.expand(3, -1, -1), mask, bias, frozen)
    expected = gradients((slots * probe * needed[..., None]).sum() + (assignment**2).sum())
    out = module(tokens, initial, mask=mask, slot_bias=bias, frozen=frozen, needed=needed)
    torch.testing.assert_close(out.assignment, assignment, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.slots[needed], slots[needed], rtol=1e-12, atol=1e-12)
    skipped = out.slots[~needed & ~frozen]
    assert skipped.numel() and torch.equal(skipped, torch.zeros_like(skipped))  # not updated: zeros
    torch.testing.assert_close(out.slots[:, 3], initial[3].expand(3, -1))  # frozen, needed or not
    got = gradients((out.slots * probe * needed[..., None]).sum() + (out.assignment**2).sum())
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    per_item = module(tokens, initial.expand(3, -1, -1), mask=mask, slot_bias=bias, frozen=frozen)  # (B, S, D) path
    torch.testing.assert_close(per_item.slots, slots, rtol=1e-12, atol=1e-12)
