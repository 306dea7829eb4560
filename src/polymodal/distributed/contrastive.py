"""One modality pair's InfoNCE over the batch of every rank: each rank embeds its own items, gathers
every rank's embeddings (with gradients) and computes its share of the global loss through
``info_nce``'s ``a_all`` / ``b_all`` / ``row_offset`` arguments (open_clip's ``local_loss``).

With DDP averaging gradients over W ranks, rank r's share is weighted by ``W * n_r / N`` (n_r its
rows, N all of them), so the average of the shares is the global loss, the loss one process would
compute on all N pairs, even when ranks hold different numbers of pairs. Dropping items of a
repeated label (``unique_labels``) is decided on the gathered labels, so it keeps the same items as
one process would.

Reference: Radford et al. 2021, CLIP, arXiv:2103.00020; Cherti et al. 2023, Reproducible scaling
laws for contrastive language-image learning (open_clip), arXiv:2212.07143.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.distributed.collectives import gather_rows, row_counts
from polymodal.distributed.process import rank, world_size
from polymodal.losses.contrastive import info_nce


def first_of_label(labels: Tensor) -> Tensor:
    """(B,) bool: True on the first item of each label >= 0, and on every item labelled < 0."""
    positions = torch.arange(labels.shape[0], device=labels.device)  # (B,)
    _, group = torch.unique(labels, return_inverse=True)  # (B,) index of each item's label
    first = torch.full_like(positions, labels.shape[0]).scatter_reduce(0, group, positions, reduce="amin")  # per label
    return (first[group] == positions) | (labels < 0)


def gathered_info_nce(
    a: Tensor,
    b: Tensor,
    labels: Tensor,
    scale: Tensor,
    *,
    unique_labels: bool,
    tile_size: int | None,
    tiled_above: int | None,
) -> Tensor | None:
    """This rank's weighted share of the InfoNCE over every rank's pairs.

    Every rank must call it for the same pairs in the same order, with zero rows if it has none.

    Args:
        a: (n, E) unit-norm embeddings of this rank's items that carry both modalities.
        b: (n, E) their partners, row i with ``a[i]``.
        labels: (n,) long item labels (-1 unknown), for ``unique_labels``.
        scale: () the logit scale.
        unique_labels: keep only the first item (in global batch order) of each label >= 0.
        tile_size, tiled_above: as ``info_nce``; N (all ranks' pairs) decides the tiling.

    Returns:
        () ``W * n_kept / N_kept * info_nce(...)``; zero (still connected to the gathered rows, so
        every rank's backward runs the same collectives) when this rank keeps no pair; None when no
        rank has a pair.
    """
    counts = row_counts(a.shape[0], a.device)
    a_all, b_all = gather_rows(a, counts), gather_rows(b, counts)  # (N, E), rank order = global batch order
    labels_all = gather_rows(labels, counts)  # (N,)
    keep = first_of_label(labels_all) if unique_labels else torch.ones_like(labels_all, dtype=torch.bool)
    total = int(keep.sum())
    if total == 0:  # the same on every rank: no pair anywhere
        return None
    start = sum(counts[: rank()])
    mine = keep[start : start + a.shape[0]]  # (n,)
    a_all, b_all = a_all[keep], b_all[keep]  # (N_kept, E)
    kept = int(mine.sum())
    if kept == 0:  # no rows here: a zero loss on the gathered rows keeps this rank in the backward
        return 0.0 * scale * (a_all.sum() + b_all.sum())
    offset = int(keep[:start].sum())  # where this rank's kept rows start among all kept rows
    share = info_nce(
        a[mine], b[mine], scale, a_all=a_all, b_all=b_all, row_offset=offset, tile_size=tile_size,
        tiled_above=tiled_above,
    )
    return share * (world_size() * kept / total)
