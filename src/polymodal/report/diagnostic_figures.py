"""Heatmaps of live-diagnostics records (the lines of ``diagnostics.jsonl``, see
``diagnostics/live.py``): the same drawings go to TensorBoard during training and into the report.

Each function takes one or more records and returns a matplotlib ``Figure``, or None when the
records hold nothing of that kind (no gradient conflict measured, no mixture of experts, no
decoupler).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from polymodal.modality import Modality
from polymodal.report.figures import SIGNED_COLORS, heatmap_figure

Record = Mapping[str, Any]
CKA_RANGE = (-0.1, 1.0)  # unbiased CKA can dip just below 0


def as_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    """Nested lists with None (JSON's stand-in for NaN) -> a float array with NaN."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def cka_labels(record: Record) -> list[str]:
    """The rows of a record's CKA matrix: ``image L0`` ..., modality-major."""
    return [f"{m} {layer}" for m in record["modalities"] for layer in record["layers"]]


def cka_figure(records: Sequence[tuple[str, Record]], per_row: int | None = None) -> Figure | None:
    """The CKA matrix between every (modality, layer) of each titled record, on one scale."""
    records = [(title, r) for title, r in records if r.get("cka")]
    if not records:
        return None
    labels = cka_labels(records[0][1])
    return heatmap_figure([(title, as_matrix(r["cka"])) for title, r in records], labels, labels, value_range=CKA_RANGE, per_row=per_row)


def conflict_figure(record: Record, title: str = "gradient cosine") -> Figure | None:
    """The (L, L) cosines between the loss terms' gradients on the backbone."""
    conflict = record.get("gradient_conflict")
    if not conflict:
        return None
    names = conflict["names"]
    return heatmap_figure([(title, as_matrix(conflict["cosine"]))], names, names, value_range=(-1.0, 1.0), colors=SIGNED_COLORS)


def experts_figure(record: Record) -> Figure | None:
    """Per mixture-of-experts block, the share of each modality's routing on each expert."""
    blocks = record.get("experts") or []
    if not blocks:
        return None
    num_experts = len(blocks[0]["share"][0])
    rows = blocks[0]["modalities"]
    panels = []
    for block in blocks:
        share = as_matrix(block["share"])
        aligned = np.full((len(rows), num_experts), np.nan)  # a modality absent in one block stays blank
        for i, modality in enumerate(block["modalities"]):
            if modality in rows:
                aligned[rows.index(modality)] = share[i]
        panels.append((f"block {block['block']}: routing share", aligned))
    return heatmap_figure(panels, rows, [f"e{j}" for j in range(num_experts)])


def leakage_matrix(record: Record) -> tuple[list[str], list[str], np.ndarray] | None:
    """(map names, modalities, (maps, modalities) leakage of each private type), or None."""
    maps = [entry for entry in record.get("leakage") or [] if entry["per_type"]]
    if not maps:
        return None
    modalities = [m.value for m in Modality if any(m.value in entry["per_type"] for entry in maps)]
    values = np.array([[np.nan if entry["per_type"].get(m) is None else entry["per_type"][m] for m in modalities] for entry in maps])
    return [entry["name"] for entry in maps], modalities, values


def leakage_figure(record: Record) -> Figure | None:
    """The leakage ratio of each decoupler map's private types (0: they read only their own modality)."""
    found = leakage_matrix(record)
    if found is None:
        return None
    names, modalities, values = found
    return heatmap_figure([("leakage of private queries", values)], names, modalities)
