"""Recall@K: the chunked float64 computation against a brute-force double loop, hand-checked cases,
and one entry per ordered modality pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polymodal.evaluation.retrieval import recall_at_k, retrieval_figures
from polymodal.modality import Modality


def brute_force_recall(query, gallery, query_labels, gallery_labels, k):
    """For each query, score every gallery item one by one, sort, look at the first k."""
    hits = 0
    for i in range(query.shape[0]):
        scored = []
        for j in range(gallery.shape[0]):
            scored.append((sum(float(x) * float(y) for x, y in zip(query[i], gallery[j])), j))
        scored.sort(key=lambda pair: -pair[0])
        hits += any(int(gallery_labels[j]) == int(query_labels[i]) for _, j in scored[:k])
    return hits / query.shape[0]


def random_set(num, dim, num_labels, seed):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(num, dim, generator=g), dim=1)
    return emb, torch.randint(0, num_labels, (num,), generator=g)


def test_chunked_recall_equals_brute_force():
    query, query_labels = random_set(37, 8, 12, seed=0)
    gallery, gallery_labels = random_set(53, 8, 12, seed=1)
    ks = (1, 5, 10)
    got = recall_at_k(query, gallery, query_labels, gallery_labels, ks, chunk_size=7)
    assert got["count"] == 37
    for k in ks:
        assert got[f"R@{k}"] == pytest.approx(brute_force_recall(query, gallery, query_labels, gallery_labels, k))
    # Recall grows with K, and a chunk size that covers everything gives the same figures.
    assert got["R@1"] <= got["R@5"] <= got["R@10"]
    assert recall_at_k(query, gallery, query_labels, gallery_labels, ks, chunk_size=1000) == got


def test_hand_checked_cases():
    eye = torch.eye(4)
    labels = torch.arange(4)
    perfect = recall_at_k(eye, eye, labels, labels, (1, 2))
    assert perfect == {"R@1": 1.0, "R@2": 1.0, "count": 4}
    # Query 0 is closest to gallery item 1 (label 1) and second-closest to item 0 (its label).
    query = F.normalize(torch.tensor([[1.0, 2.0, 0.0, 0.0]]), dim=1)
    got = recall_at_k(query, eye, torch.tensor([0]), labels, (1, 2, 10))
    assert got == {"R@1": 0.0, "R@2": 1.0, "R@10": 1.0, "count": 1}  # K above the gallery size is capped
    # A label absent from the gallery is always a miss.
    assert recall_at_k(query, eye, torch.tensor([9]), labels, (1, 4))["R@4"] == 0.0
    # Any gallery item with the same label is a hit, not only "the" paired item.
    assert recall_at_k(query, eye, torch.tensor([1]), torch.tensor([0, 1, 1, 1]), (1,))["R@1"] == 1.0


def test_figures_cover_every_ordered_pair():
    sets = {
        Modality.IMAGE: random_set(20, 6, 5, seed=2),
        Modality.TEXT: random_set(15, 6, 5, seed=3),
        Modality.AUDIO: random_set(18, 6, 5, seed=4),
    }
    figures = retrieval_figures(sets, ks=(1, 5))
    assert set(figures) == {
        "image_to_text", "image_to_audio", "text_to_image", "text_to_audio", "audio_to_image", "audio_to_text",
    }  # fmt: skip
    (q, ql), (g, gl) = sets[Modality.AUDIO], sets[Modality.IMAGE]
    assert figures["audio_to_image"]["R@5"] == pytest.approx(brute_force_recall(q, g, ql, gl, 5))
    assert figures["audio_to_image"]["count"] == 18


def test_bad_shapes_are_refused():
    emb, labels = random_set(4, 3, 2, seed=5)
    with pytest.raises(ValueError, match="must be"):
        recall_at_k(emb, torch.randn(4, 5), labels, labels)
    with pytest.raises(ValueError, match="one label per"):
        recall_at_k(emb, emb, labels[:3], labels)
