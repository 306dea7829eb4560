"""X -> text accuracy: generate a caption for every item and compare it with the reference.

For the built-in data a caption is right when it names the right number (any template: "42",
"forty two", "the number forty two"); for a manifest it must equal the reference text exactly.
Items whose label is a held-out number (never seen in training) are also scored apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from polymodal.data.text import TextTokenizer
from polymodal.modality import Modality


@torch.no_grad()
def caption_accuracy(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable,
    tokenizer: TextTokenizer,
    modality: Modality,
    *,
    heldout_labels: frozenset[int] = frozenset(),
    parse_label: Callable[[str], int | None] | None = None,
    batch_size: int = 128,
    max_new_tokens: int = 24,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> dict[str, float]:
    """Exact-match accuracy of ``modality`` -> text, overall and on held-out labels.

    Returns:
        ``{"exact": ..., "count": ..., "heldout_exact": ..., "heldout_count": ...}`` (heldout keys
        only when some item has a held-out label), plus ``examples``: a few (reference, generated).
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    hits = total = heldout_hits = heldout_total = 0
    examples: list[tuple[str, str]] = []
    for batch in loader:
        if modality not in batch.inputs or Modality.TEXT not in batch.inputs:
            continue
        batch = batch.to(device)
        keep = batch.present[modality] & batch.present[Modality.TEXT]
        mask = batch.masks.get(modality)
        generated = model.generate_text(
            modality,
            batch.inputs[modality][keep],
            None if mask is None else mask[keep],
            max_new_tokens=max_new_tokens,
        )
        references = batch.inputs[Modality.TEXT][keep].tolist()
        labels = batch.labels[keep].tolist()
        for ids, ref_ids, label in zip(generated, references, labels):
            text = tokenizer.decode(ids)
            reference = tokenizer.decode(ref_ids)
            if parse_label is not None:
                right = parse_label(text) == label
            else:
                right = text.strip() == reference.strip()
            hits += right
            total += 1
            if label in heldout_labels:
                heldout_hits += right
                heldout_total += 1
            if len(examples) < 8:
                examples.append((reference, text))
        if limit is not None and total >= limit:
            break
    model.train(was_training)
    out: dict[str, float] = {"exact": hits / max(total, 1), "count": total}
    if heldout_total:
        out.update(heldout_exact=heldout_hits / heldout_total, heldout_count=heldout_total)
    out["examples"] = examples  # type: ignore[assignment]
    return out
