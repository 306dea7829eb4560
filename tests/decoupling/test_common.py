"""The opening gate's schedule, the leakage ratio against a hand computation, and input checks."""

from __future__ import annotations

import pytest
import torch

from polymodal.decoupling.common import AttentionMap, OpeningGate, check_inputs, leakage_ratios
from polymodal.modality import Modality
from polymodal.modality import MODALITY_INDEX

IMAGE, TEXT = MODALITY_INDEX[Modality.IMAGE], MODALITY_INDEX[Modality.TEXT]


@pytest.mark.parametrize(
    ("start", "end", "points"),
    [
        (0.3, 0.6, [(0.0, 0.0), (0.29, 0.0), (0.3, 0.0), (0.375, 0.25), (0.45, 0.5), (0.6, 1.0), (0.9, 1.0), (1.0, 1.0)]),
        (0.1, 0.5, [(0.05, 0.0), (0.2, 0.25), (0.4, 0.75), (0.5, 1.0)]),
        (0.5, 0.5, [(0.49, 0.0), (0.5, 1.0)]),  # opens at once
    ],
)
def test_gate_follows_its_schedule(start, end, points):
    gate = OpeningGate(start, end)
    assert gate.value == 0.0
    for fraction, expected in points:
        gate.set_progress(fraction)
        assert gate.value == pytest.approx(expected, abs=1e-12), fraction
    gate.set_progress(0.0)  # recomputed from progress alone, so it can go back (exact resume)
    assert gate.value == 0.0


def test_gate_rejects_bad_points():
    with pytest.raises(ValueError, match="open_start"):
        OpeningGate(0.7, 0.6)


def test_leakage_ratio_by_hand():
    # Two items, keys [image, image, text, pad]; item 1 has no image (its image keys are padding).
    key_modality = torch.tensor([[IMAGE, IMAGE, TEXT, -1], [-1, -1, TEXT, TEXT]])
    query_type = torch.tensor([IMAGE, TEXT, -1])
    weights = torch.tensor(
        [
            [[0.5, 0.2, 0.3, 0.9], [0.1, 0.1, 0.8, 0.0], [0.3, 0.3, 0.4, 0.0]],
            [[0.0, 0.0, 0.6, 0.4], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]],
        ]
    )
    ratios = leakage_ratios(AttentionMap(weights, query_type, key_modality))
    # image queries: only item 0 holds image; foreign = 0.3 (the text key), real total = 1.0 (pad ignored).
    # text queries: both items; foreign = 0.1 + 0.1 on item 0, total = 1.0 + 1.0.
    assert set(ratios) == {Modality.IMAGE, Modality.TEXT}
    assert ratios[Modality.IMAGE].item() == pytest.approx(0.3)
    assert ratios[Modality.TEXT].item() == pytest.approx(0.2 / 2.0)


def test_leakage_ratio_is_differentiable_and_skips_absent_modalities():
    key_modality = torch.tensor([[TEXT, TEXT]])
    weights = torch.tensor([[[0.5, 0.5], [0.2, 0.8]]], requires_grad=True)
    ratios = leakage_ratios(AttentionMap(weights, torch.tensor([IMAGE, TEXT]), key_modality))
    assert set(ratios) == {Modality.TEXT} and ratios[Modality.TEXT].item() == 0.0
    ratios[Modality.TEXT].backward()
    assert weights.grad is not None


def test_check_inputs_names_the_problem():
    states = {Modality.TEXT: torch.randn(2, 3, 8)}
    masks = {Modality.TEXT: torch.ones(2, 3, dtype=torch.bool)}
    assert check_inputs(states, masks, (Modality.TEXT,), 8) == 2
    with pytest.raises(ValueError, match="audio is not one of"):
        check_inputs({Modality.AUDIO: states[Modality.TEXT]}, {Modality.AUDIO: masks[Modality.TEXT]}, (Modality.TEXT,), 8)
    with pytest.raises(ValueError, match=r"masks\[text\] must be bool"):
        check_inputs(states, {Modality.TEXT: masks[Modality.TEXT].float()}, (Modality.TEXT,), 8)
    with pytest.raises(ValueError, match=r"states\[text\] must be \(B, N, 16\)"):
        check_inputs(states, masks, (Modality.TEXT,), 16)
    two = {Modality.TEXT: states[Modality.TEXT], Modality.IMAGE: torch.randn(3, 4, 8)}
    two_masks = {**masks, Modality.IMAGE: torch.ones(3, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="same B items"):
        check_inputs(two, two_masks, (Modality.TEXT, Modality.IMAGE), 8)
