"""Leakage ratio: hand-checked tiny maps, a per-item Python loop as the reference, a private query
bank (masked cross-attention) that has exactly zero leakage, and the input conventions (heads,
padding, per-item layouts, weights normalised over slots)."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.diagnostics import MODALITY_ORDER, SHARED, TypedAttention, leakage_ratio, modality_ids, modality_mass
from polymodal.modality import Modality

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO


def test_hand_checked_map():
    attention = torch.tensor(
        [
            [0.5, 0.3, 0.2, 0.0],  # text slot: 0.2 on image tokens
            [0.1, 0.0, 0.45, 0.45],  # image slot: 0.1 on text tokens
            [0.25, 0.25, 0.25, 0.25],  # shared slot: half and half
        ]
    )[None]  # (1, 3, 4)
    typed = TypedAttention(attention, (TEXT, IMAGE, SHARED), modality_ids([(TEXT, 2), (IMAGE, 2)]))
    leak = leakage_ratio(typed)
    torch.testing.assert_close(leak.per_slot[:2], torch.tensor([0.2, 0.1], dtype=torch.float64))
    assert math.isnan(leak.per_slot[2])
    assert leak.per_type == pytest.approx({TEXT: 0.2, IMAGE: 0.1})
    assert leak.shared_mass == pytest.approx({IMAGE: 0.5, TEXT: 0.5, AUDIO: 0.0})
    torch.testing.assert_close(leak.mass.sum(dim=1), torch.ones(3, dtype=torch.float64))


def _loop_leakage(attention, slot_types, token_modalities, token_mask) -> list[float]:
    """Per slot: mean over items of 1 - (mass on own modality) / (mass on real tokens)."""
    batch, num_slots, num_tokens = attention.shape
    out = []
    for s in range(num_slots):
        own_id = MODALITY_ORDER.index(slot_types[s])
        ratios = []
        for b in range(batch):
            total = own = 0.0
            for n in range(num_tokens):
                if token_mask[b, n]:
                    total += attention[b, s, n].item()
                    own += attention[b, s, n].item() if token_modalities[b, n] == own_id else 0.0
            if total > 0:
                ratios.append(1 - own / total)
        out.append(sum(ratios) / len(ratios))
    return out


def test_matches_a_python_loop_with_padding_and_per_item_layouts():
    gen = torch.Generator().manual_seed(0)
    batch, num_slots, num_tokens = 4, 5, 9
    attention = torch.rand(batch, num_slots, num_tokens, generator=gen).softmax(dim=-1)
    token_modalities = torch.randint(0, 3, (batch, num_tokens), generator=gen)
    token_mask = torch.rand(batch, num_tokens, generator=gen) > 0.3
    token_mask[:, 0] = True
    slot_types = (TEXT, IMAGE, AUDIO, TEXT, IMAGE)
    leak = leakage_ratio(TypedAttention(attention, slot_types, token_modalities, token_mask))
    want = _loop_leakage(attention, slot_types, token_modalities, token_mask)
    torch.testing.assert_close(leak.per_slot, torch.tensor(want, dtype=torch.float64))
    assert leak.per_type[TEXT] == pytest.approx((want[0] + want[3]) / 2)


class _TypedQueries(torch.nn.Module):
    """Learned queries reading concatenated tokens by one-head cross-attention; ``private`` masks
    each private query's logits to its own modality's tokens (seed 003's query banks)."""

    def __init__(self, slot_types, dim: int = 8) -> None:
        super().__init__()
        self.slot_types = slot_types
        self.queries = torch.nn.Parameter(torch.randn(len(slot_types), dim))

    def forward(self, tokens, token_modalities, *, private: bool) -> TypedAttention:
        logits = torch.einsum("sd,bnd->bsn", self.queries, tokens)  # (B, S, N)
        if private:
            own = torch.tensor([MODALITY_ORDER.index(t) if t != SHARED else -1 for t in self.slot_types])  # (S,)
            allowed = (own[:, None] == token_modalities[None, :]) | (own[:, None] < 0)  # (S, N)
            logits = logits.masked_fill(~allowed, float("-inf"))
        return TypedAttention(logits.softmax(dim=-1), self.slot_types, token_modalities)


def test_private_query_bank_has_zero_leakage_and_an_unmasked_one_does_not():
    torch.manual_seed(1)
    layout = modality_ids([(TEXT, 6), (IMAGE, 10), (AUDIO, 4)])
    module = _TypedQueries((TEXT, TEXT, IMAGE, AUDIO, SHARED))
    tokens = torch.randn(3, 20, 8)
    private = leakage_ratio(module(tokens, layout, private=True))
    assert all(value == 0.0 for value in private.per_type.values())
    assert sum(private.shared_mass.values()) == pytest.approx(1.0)
    open_bank = leakage_ratio(module(tokens, layout, private=False))
    assert min(open_bank.per_type.values()) > 0.05


def test_heads_are_averaged_and_slot_normalised_weights_give_the_same_ratios():
    gen = torch.Generator().manual_seed(2)
    per_head = torch.rand(2, 4, 3, 6, generator=gen)  # (B, H, S, N)
    layout = modality_ids([(IMAGE, 3), (AUDIO, 3)])
    types = (IMAGE, AUDIO, SHARED)
    by_head = leakage_ratio(TypedAttention(per_head, types, layout))
    averaged = leakage_ratio(TypedAttention(per_head.mean(dim=1), types, layout))
    torch.testing.assert_close(by_head.mass, averaged.mass)
    # Slot Attention normalises over slots, not tokens: rows rescaled by any positive factor
    # keep their ratios.
    over_slots = per_head[:, 0].softmax(dim=1)  # (B, S, N) each token's weights sum to 1 over slots
    rescaled = over_slots / over_slots.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(modality_mass(TypedAttention(over_slots, types, layout)), modality_mass(TypedAttention(rescaled, types, layout)))


def test_a_slot_that_attends_only_padding_in_one_item_is_left_out_there():
    attention = torch.tensor([[[0.0, 0.0, 1.0]], [[0.5, 0.5, 0.0]]])  # (2, 1, 3): item 0 reads only padding
    mask = torch.tensor([[True, True, False], [True, True, True]])
    leak = leakage_ratio(TypedAttention(attention, (TEXT,), modality_ids([(TEXT, 1), (IMAGE, 2)]), mask))
    assert leak.per_slot.item() == pytest.approx(0.5)  # item 1 alone


def test_errors_name_the_problem():
    layout = modality_ids([(TEXT, 2), (IMAGE, 2)])
    with pytest.raises(ValueError, match="2 slot_types for 3 slots"):
        TypedAttention(torch.rand(1, 3, 4), (TEXT, IMAGE), layout)
    with pytest.raises(ValueError, match="Modality members or 'shared'"):
        TypedAttention(torch.rand(1, 2, 4), ("text", IMAGE), layout)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\)"):
        TypedAttention(torch.rand(1, 2, 4), (TEXT, IMAGE), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer modality ids"):
        TypedAttention(torch.rand(1, 2, 4), (TEXT, IMAGE), layout.float())
    with pytest.raises(ValueError, match=r"token_mask \(1, 3\) must be \(B, N\)"):
        TypedAttention(torch.rand(1, 2, 4), (TEXT, IMAGE), layout, torch.ones(1, 3, dtype=torch.bool))
    assert modality_ids([(AUDIO, 1), (TEXT, 2)]).tolist() == [2, 1, 1]
