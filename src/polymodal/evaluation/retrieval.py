"""Cross-modal retrieval recall@K: rank a gallery by cosine similarity to each query; a hit is a
gallery item with the query's label among the top K.

With labelled data (the built-in numbers) every item sharing the number counts as a right answer,
so an image of "42" retrieving any caption or utterance of 42 is a hit. Similarities are computed in
float64, over chunks of queries, so the (Q, G) matrix is never held whole.

Reference: the image-text retrieval protocol of Karpathy & Fei-Fei 2015, Deep Visual-Semantic
Alignments, arXiv:1412.2306, as reported for CLIP (Radford et al. 2021, arXiv:2103.00020).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polymodal.modality import Modality

DEFAULT_KS = (1, 5, 10)
# Queries per chunk: a (1024, G) float64 block is 80 MiB at G = 10k.
DEFAULT_CHUNK = 1024


@torch.no_grad()
def recall_at_k(
    query_emb: Tensor,
    gallery_emb: Tensor,
    query_labels: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """Share of queries with a same-label gallery item among their K most similar.

    Args:
        query_emb: (Q, D) embeddings, unit-norm (the score is the dot product).
        gallery_emb: (G, D) embeddings.
        query_labels: (Q,) integer labels.
        gallery_labels: (G,) integer labels.
        ks: the cut-offs K; each is capped at G.
        chunk_size: queries scored at once.

    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ..., "count": Q}``. A query whose label is absent from
        the gallery counts as a miss.
    """
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query {tuple(query_emb.shape)} and gallery {tuple(gallery_emb.shape)} must be (Q, D) and (G, D)")
    if query_labels.shape != query_emb.shape[:1] or gallery_labels.shape != gallery_emb.shape[:1]:
        raise ValueError("need one label per query and per gallery item")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {list(ks)}")
    num_queries, num_gallery = query_emb.shape[0], gallery_emb.shape[0]
    if num_queries == 0 or num_gallery == 0:
        return {**{f"R@{k}": 0.0 for k in ks}, "count": num_queries}
    k_max = min(max(ks), num_gallery)
    gallery = gallery_emb.to(torch.float64)  # (G, D)
    gallery_labels = gallery_labels.to(query_emb.device)
    hits_at = torch.zeros(len(ks), dtype=torch.long)  # per K, queries with a hit
    for start in range(0, num_queries, chunk_size):
        queries = query_emb[start : start + chunk_size].to(torch.float64)  # (q, D)
        scores = queries @ gallery.T  # (q, D) @ (D, G) -> (q, G)
        top = scores.topk(k_max, dim=1).indices  # (q, k_max), best first
        same = gallery_labels[top] == query_labels[start : start + chunk_size, None].to(gallery_labels.device)  # (q, k_max)
        first_hit = torch.where(same.any(dim=1), same.float().argmax(dim=1), k_max)  # (q,) rank of the first hit
        for i, k in enumerate(ks):
            hits_at[i] += int((first_hit < min(k, num_gallery)).sum())
    return {**{f"R@{k}": float(h) / num_queries for k, h in zip(ks, hits_at.tolist())}, "count": num_queries}


def retrieval_figures(
    embeddings: Mapping[Modality, tuple[Tensor, Tensor]],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, dict[str, float]]:
    """Recall@K for every ordered pair of distinct modalities.

    Args:
        embeddings: per modality, ((N_m, D) unit-norm embeddings, (N_m,) labels).
        ks: the cut-offs.

    Returns:
        ``{"image_to_text": {"R@1": ..., ...}, "text_to_image": {...}, ...}``.
    """
    out: dict[str, dict[str, float]] = {}
    for query, gallery in ((q, g) for q in embeddings for g in embeddings if q is not g):
        query_emb, query_labels = embeddings[query]
        gallery_emb, gallery_labels = embeddings[gallery]
        out[f"{query}_to_{gallery}"] = recall_at_k(
            query_emb, gallery_emb, query_labels, gallery_labels, ks, chunk_size=chunk_size
        )
    return out
