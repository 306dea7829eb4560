"""Hungarian slot matching: recovers a known permutation of noisy slots, is invariant to slot order,
reaches the best total that a brute force over every permutation finds, compares runs with
rotated feature spaces through CKA, and assigns slots to modalities by their attention."""

from __future__ import annotations

import itertools

import pytest
import torch

from polymodal.diagnostics import SHARED, hungarian_match, match_slots, match_slots_to_modalities, slot_similarity
from polymodal.modality import Modality

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO


def _slots(batch: int = 64, num_slots: int = 8, dim: int = 16, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, D) random slots and a random permutation (S,)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_slots, dim, generator=gen), torch.randperm(num_slots, generator=gen)


@pytest.mark.parametrize("measure", ["cosine", "cka"])
def test_recovers_a_known_permutation_of_noisy_slots(measure):
    a, perm = _slots()
    b = a[:, perm] + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))  # b's slot j is a's perm[j]
    matching = match_slots(a, b, measure=measure)
    inverse = perm.argsort()  # a's slot i sits at b's position inverse[i]
    torch.testing.assert_close(matching.permutation, inverse)
    assert matching.accuracy(inverse) == 1.0
    assert matching.accuracy() < 1.0  # compared slot for slot, the relabelling looks like drift
    torch.testing.assert_close(b[:, matching.permutation], a, atol=0.5, rtol=0)
    assert matching.matched_similarity.min() > 0.9


def test_invariant_to_slot_order():
    a, _ = _slots(seed=2)
    b = a + 0.8 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))  # noisy enough to be ambiguous
    base = match_slots(a, b)
    for seed in range(3):
        order = torch.randperm(a.shape[1], generator=torch.Generator().manual_seed(seed))
        reordered = match_slots(a[:, order], b)
        torch.testing.assert_close(reordered.permutation, base.permutation[order])
        assert reordered.matched_similarity.sum().item() == pytest.approx(base.matched_similarity.sum().item())


def test_hungarian_total_equals_a_brute_force_over_all_permutations():
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        similarity = torch.randn(6, 6, generator=gen, dtype=torch.float64)
        best = max(sum(similarity[i, p[i]].item() for i in range(6)) for p in itertools.permutations(range(6)))
        assert hungarian_match(similarity).matched_similarity.sum().item() == pytest.approx(best)


def test_cka_matches_runs_whose_feature_spaces_are_rotated_where_cosine_cannot():
    a, perm = _slots(batch=128, dim=24, seed=5)
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(6)))
    b = a[:, perm] @ rotation + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    assert match_slots(a, b, measure="cka").accuracy(perm.argsort()) == 1.0
    assert match_slots(a, b, measure="cosine").accuracy(perm.argsort()) < 0.5


def test_cosine_similarity_is_the_mean_over_items():
    a, _ = _slots(batch=5, num_slots=3, dim=4, seed=8)
    b, _ = _slots(batch=5, num_slots=3, dim=4, seed=9)
    sim = slot_similarity(a, b)
    want = torch.nn.functional.cosine_similarity(a[:, 1].double(), b[:, 2].double(), dim=-1).mean()
    assert sim[1, 2].item() == pytest.approx(want.item())
    torch.testing.assert_close(slot_similarity(a[0], b[0]), slot_similarity(a[:1], b[:1]))  # (S, D): one item


def test_slots_to_modalities_by_attention_share():
    slot_types = (TEXT, TEXT, IMAGE, AUDIO, SHARED)
    # columns image, text, audio (MODALITY_ORDER)
    mass = torch.tensor(
        [
            [0.8, 0.2, 0.0],  # declared text, reads image
            [0.1, 0.9, 0.0],
            [0.3, 0.7, 0.0],  # declared image, reads text
            [0.0, 0.0, 1.0],
            [0.4, 0.4, 0.2],  # shared: not matched
        ]
    )
    matching = match_slots_to_modalities(mass, slot_types)
    assert matching.slots.tolist() == [0, 1, 2, 3]
    assert matching.assigned == (IMAGE, TEXT, TEXT, AUDIO)
    assert matching.accuracy == 0.5
    # Two text slots are exchangeable: swapping them changes nothing.
    swapped = mass[[1, 0, 2, 3, 4]]
    assert match_slots_to_modalities(swapped, slot_types).accuracy == 0.5


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="square"):
        hungarian_match(torch.rand(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="use measure='cka'"):
        slot_similarity(torch.rand(4, 2, 3), torch.rand(4, 2, 5))
    with pytest.raises(ValueError, match="unknown slot similarity"):
        slot_similarity(torch.rand(4, 2, 3), torch.rand(4, 2, 3), measure="l2")
    with pytest.raises(ValueError, match="no private slot"):
        match_slots_to_modalities(torch.rand(2, 3), (SHARED, SHARED))
    with pytest.raises(ValueError, match="permutation of shape"):
        match_slots(torch.rand(4, 3, 2), torch.rand(4, 3, 2)).accuracy(torch.arange(2))
