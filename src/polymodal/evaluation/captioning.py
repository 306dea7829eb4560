"""X -> text accuracy: generate a caption for every item and compare it with the reference.

When the dataset can read a label back from a caption (``DataSource.label_parser``: the built-in
data's "42", "forty two" and "the number forty two" all name 42), a caption is right when it names
the item's label; otherwise it must equal the reference text exactly. Items whose label never
occurs in training are also scored apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from polymodal.data.text import TextTokenizer
from polymodal.modality import Modality

EXAMPLES_KEPT = 8


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
        ``{"exact", "count"}`` (and ``heldout_exact``, ``heldout_count`` when some item has a
        held-out label), plus ``examples``: a few (reference, generated) pairs.
    """
    was_training = model.training
    model.eval()
    rows: list[tuple[str, str, int]] = []  # (reference, generated, label)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
        if modality not in batch.inputs or Modality.TEXT not in batch.inputs:
            continue
        batch = batch.to(device)
        keep = batch.present[modality] & batch.present[Modality.TEXT]
        mask = batch.masks.get(modality)
        inputs, mask = batch.inputs[modality][keep], None if mask is None else mask[keep]
        generated = model.generate(modality, Modality.TEXT, inputs, mask, max_new_tokens=max_new_tokens)
        references = batch.inputs[Modality.TEXT][keep].tolist()
        rows += [(tokenizer.decode(r), tokenizer.decode(g), y) for r, g, y in zip(references, generated, batch.labels[keep].tolist())]
        if limit is not None and len(rows) >= limit:
            break
    model.train(was_training)
    return _score(rows, heldout_labels, parse_label)


def _score(rows: list[tuple[str, str, int]], heldout: frozenset[int], parse_label) -> dict[str, float]:
    right = [parse_label(text) == label if parse_label else text.strip() == ref.strip() for ref, text, label in rows]
    held = [ok for ok, (_, _, label) in zip(right, rows) if label in heldout]
    out: dict[str, float] = {"exact": sum(right) / max(len(rows), 1), "count": len(rows)}
    if held:
        out.update(heldout_exact=sum(held) / len(held), heldout_count=len(held))
    out["examples"] = [(ref, text) for ref, text, _ in rows[:EXAMPLES_KEPT]]  # type: ignore[assignment]
    return out
