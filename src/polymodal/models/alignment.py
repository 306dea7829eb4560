"""Contrastive alignment's bookkeeping: modality pairs, their names, and one symmetric InfoNCE term
per pair over the items of a batch that carry both (``tasks/contrastive.py`` trains it).

Reference: Radford et al. 2021, Learning Transferable Visual Models From Natural Language
Supervision (CLIP), arXiv:2103.00020 (symmetric InfoNCE over a batch of pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.data.batch import Batch
from polymodal.distributed.contrastive import first_of_label, gathered_info_nce
from polymodal.losses.contrastive import info_nce
from polymodal.modality import Modality

# Order of the two modalities in a pair's name: "image_text", "audio_text", "image_audio".
PAIR_ORDER = (Modality.IMAGE, Modality.AUDIO, Modality.TEXT)
# Every pair, in the order the loss terms are computed and logged.
PAIRS = (
    (Modality.IMAGE, Modality.TEXT),
    (Modality.AUDIO, Modality.TEXT),
    (Modality.IMAGE, Modality.AUDIO),
)
# In-batch retrieval accuracy is logged only up to this many pairs (it needs the N x N logits).
MAX_METRIC_BATCH = 4096


def pair_name(a: Modality, b: Modality) -> str:
    """``(TEXT, IMAGE)`` -> ``"image_text"``: the two modalities in ``PAIR_ORDER``."""
    if a is b:
        raise ValueError(f"a pair needs two different modalities, got {a} twice")
    first, second = sorted((a, b), key=PAIR_ORDER.index)
    return f"{first.value}_{second.value}"


def parse_pair(name: str) -> tuple[Modality, Modality]:
    """``"image_text"`` -> ``(IMAGE, TEXT)``; a ValueError naming the valid pairs otherwise."""
    valid = {pair_name(a, b): (a, b) for a, b in PAIRS}
    if name not in valid:
        raise ValueError(f"unknown modality pair {name!r}; valid: {', '.join(valid)}")
    return valid[name]


def pair_losses(
    embedded: dict[Modality, Tensor],
    batch: Batch,
    pairs: list[tuple[Modality, Modality]],
    scale: Tensor,
    *,
    prefix: str,
    unique_labels: bool = False,
    tile_size: int | None = None,
    tiled_above: int | None = None,
    gather: bool = False,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """One symmetric InfoNCE term per pair, over the items that carry both modalities.

    Args:
        embedded: per modality, (B_m, E) unit-norm embeddings of the items where
            ``batch.present[modality]`` is True, in batch order.
        pairs: the pairs to score; a pair missing a modality in ``embedded`` is skipped.
        scale: () the logit scale (1 / temperature).
        prefix: loss names are ``<prefix><pair>``, e.g. ``clip_image_text``.
        unique_labels: keep one item per label (>= 0), so two items of one class are never each
            other's negatives.
        gather: take negatives from every rank's batch (data-parallel training): this rank's
            weighted share of the global loss (``distributed/contrastive.py``). Every rank must
            then call with the same pairs, holding items or not.

    Returns:
        losses ``<prefix><pair>`` and metrics ``<prefix><pair>_acc`` (in-batch a -> b top-1).
    """
    none = torch.zeros(batch.size, dtype=torch.bool, device=batch.labels.device)
    present = {m: batch.present.get(m, none) for m in embedded}  # a modality the batch lacks: no item has it
    rank = {m: present[m].long().cumsum(0) - 1 for m in embedded}  # (B,) item -> its row
    losses: dict[str, Tensor] = {}
    metrics: dict[str, float] = {}
    for a, b in pairs:
        if a not in embedded or b not in embedded:
            continue
        both = present[a] & present[b]  # (B,)
        name = prefix + pair_name(a, b)
        if gather:
            emb_a, emb_b = embedded[a][rank[a][both]], embedded[b][rank[b][both]]  # (n, E) each
            loss = gathered_info_nce(emb_a, emb_b, batch.labels[both], scale, unique_labels=unique_labels,
                                     tile_size=tile_size, tiled_above=tiled_above)  # fmt: skip
            if loss is not None:
                losses[name] = loss
            continue
        if unique_labels:  # among the items that have both, the first of each label
            rows = both.nonzero().squeeze(1)  # (n,)
            both = torch.zeros_like(both).index_fill_(0, rows[first_of_label(batch.labels[rows])], True)
        if not both.any():
            continue
        emb_a = embedded[a][rank[a][both]]  # (n, E)
        emb_b = embedded[b][rank[b][both]]  # (n, E), row i pairs with emb_a[i]
        losses[name] = info_nce(emb_a, emb_b, scale, tile_size=tile_size, tiled_above=tiled_above)
        if emb_a.shape[0] <= MAX_METRIC_BATCH:
            with torch.no_grad():
                hits = (emb_a @ emb_b.T).argmax(dim=1) == torch.arange(emb_a.shape[0], device=emb_a.device)
                metrics[f"{name}_acc"] = hits.float().mean().item()
    return losses, metrics
