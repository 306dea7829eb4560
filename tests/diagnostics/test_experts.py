"""Expert usage per modality: hand-checked one-hot and uniform routing, top-2 counts, gate weights
and padding, against a Python loop over the routing table."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.diagnostics import MODALITY_ORDER, expert_usage, modality_ids
from polymodal.modality import Modality

TEXT, IMAGE, AUDIO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO


def test_one_hot_routing_has_zero_entropy():
    layout = modality_ids([(TEXT, 3), (IMAGE, 2)])  # (5,)
    expert_ids = torch.tensor([[0], [0], [0], [2], [2]])  # (N, k=1): text -> expert 0, image -> expert 2
    usage = expert_usage(expert_ids, layout, 4)
    assert usage.modalities == (IMAGE, TEXT)  # present ones, in MODALITY_ORDER; no audio row
    torch.testing.assert_close(usage.share, torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.float64))
    torch.testing.assert_close(usage.counts.sum(dim=1), torch.tensor([2.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(usage.entropy, torch.zeros(2, dtype=torch.float64))


def test_uniform_routing_has_entropy_log_e():
    expert_ids = torch.arange(8).reshape(1, 8, 1) % 4  # (B=1, N=8, k=1): every expert twice
    usage = expert_usage(expert_ids, modality_ids([(AUDIO, 8)]), 4)
    torch.testing.assert_close(usage.share, torch.full((1, 4), 0.25, dtype=torch.float64))
    assert usage.entropy.item() == pytest.approx(math.log(4))
    assert usage.normalized_entropy.item() == pytest.approx(1.0)


def test_top2_counts_gates_and_padding_by_hand():
    expert_ids = torch.tensor([[[0, 1], [0, 2], [3, 1]]])  # (B=1, N=3, k=2)
    layout = modality_ids([(TEXT, 2), (IMAGE, 1)])
    usage = expert_usage(expert_ids, layout, 4)
    torch.testing.assert_close(usage.share[1], torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64))  # text
    assert usage.entropy[1].item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    gates = torch.tensor([[[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]]])
    gated = expert_usage(expert_ids, layout, 4, gates=gates)
    torch.testing.assert_close(gated.counts[1], torch.tensor([1.5, 0.1, 0.4, 0.0], dtype=torch.float64))
    masked = expert_usage(expert_ids, layout, 4, token_mask=torch.tensor([[True, False, True]]))
    torch.testing.assert_close(masked.counts[1], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_matches_a_python_loop():
    gen = torch.Generator().manual_seed(0)
    batch, num_tokens, top_k, num_experts = 3, 10, 2, 5
    expert_ids = torch.randint(0, num_experts, (batch, num_tokens, top_k), generator=gen)
    token_modalities = torch.randint(0, 3, (batch, num_tokens), generator=gen)
    gates = torch.rand(batch, num_tokens, top_k, generator=gen)
    counts = torch.zeros(3, num_experts, dtype=torch.float64)
    for b in range(batch):
        for n in range(num_tokens):
            for k in range(top_k):
                counts[token_modalities[b, n], expert_ids[b, n, k]] += gates[b, n, k].item()
    usage = expert_usage(expert_ids, token_modalities, num_experts, gates=gates)
    present = [i for i in range(3) if counts[i].sum() > 0]
    assert usage.modalities == tuple(MODALITY_ORDER[i] for i in present)
    torch.testing.assert_close(usage.counts, counts[present])
    torch.testing.assert_close(usage.share.sum(dim=1), torch.ones(len(present), dtype=torch.float64))


def test_errors_name_the_problem():
    layout = modality_ids([(TEXT, 2)])
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 4\)"):
        expert_usage(torch.tensor([[0], [4]]), layout, 4)
    with pytest.raises(ValueError, match="integer expert indices"):
        expert_usage(torch.tensor([[0.0], [1.0]]), layout, 4)
    with pytest.raises(ValueError, match="gates"):
        expert_usage(torch.tensor([[0], [1]]), layout, 4, gates=torch.ones(2, 2))
