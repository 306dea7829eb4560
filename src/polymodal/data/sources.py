"""Pick the data a config names: the built-in spoken numbers, or a user's JSONL manifest."""

from __future__ import annotations

import dataclasses

import numpy as np
from torch.utils.data import Dataset, Subset

from polymodal.config import DataConfig

# Share of a single manifest kept apart for validation/test when no val_manifest is given.
MANIFEST_HOLDOUT = 0.1


@dataclasses.dataclass(frozen=True)
class DataBundle:
    """Splits plus what the tokenizer and the evaluation need.

    Attributes:
        train_texts: every training caption (the BPE tokenizer is trained on these).
        heldout_labels: labels that never occur in training (compositional zero-shot); empty for
            manifests.
        parse_label: maps generated text back to a label (built-in data), or None (compare text).
        train_labels: the labels of the training split (built-in data; empty for manifests).
        glyphs: (10, 28, 28) uint8, the reference handwriting's digits (built-in data; else None).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    train_texts: list[str]
    heldout_labels: frozenset[int]
    parse_label: object | None = None
    train_labels: frozenset[int] = frozenset()
    glyphs: object | None = None


def build_data(config: DataConfig, *, seed: int) -> DataBundle:
    if config.source == "spoken_numbers":
        return _spoken_numbers(config, seed)
    return _manifest(config, seed)


def _spoken_numbers(config: DataConfig, seed: int) -> DataBundle:
    from polymodal.data.numbers import parse_number
    from polymodal.data.spoken_numbers import build_spoken_numbers, reference_glyphs

    data = build_spoken_numbers(
        num_samples=config.num_samples,
        seed=seed,
        max_digits=config.max_digits,
        image_height=config.image_height,
        image_width=config.image_width,
        sample_rate=config.sample_rate,
    )
    texts = [data.captions[i] for i in data.split_indices("train")]
    return DataBundle(
        train=data.split("train"),
        val=data.split("val"),
        test=data.split("test"),
        train_texts=texts,
        heldout_labels=frozenset(int(n) for n in data.heldout_numbers),
        parse_label=parse_number,
        train_labels=frozenset(int(data.labels[i]) for i in data.split_indices("train")),
        glyphs=reference_glyphs(data),
    )


def _manifest(config: DataConfig, seed: int) -> DataBundle:
    from polymodal.data.manifest import ManifestDataset

    def load(path: str) -> ManifestDataset:
        return ManifestDataset(
            path,
            image_height=config.image_height,
            image_width=config.image_width,
            sample_rate=config.sample_rate,
            max_audio_seconds=config.max_audio_seconds,
        )

    full = load(config.manifest)
    if config.val_manifest:
        train, held = full, load(config.val_manifest)
        train_entries = full.entries
    else:  # deterministic split of one manifest
        order = np.random.default_rng(seed).permutation(len(full))
        num_held = max(1, int(len(full) * MANIFEST_HOLDOUT))
        train, held = Subset(full, order[num_held:].tolist()), Subset(full, order[:num_held].tolist())
        train_entries = [full.entries[i] for i in order[num_held:]]
    texts = [e["text"] for e in train_entries if isinstance(e.get("text"), str)]
    return DataBundle(train=train, val=held, test=held, train_texts=texts, heldout_labels=frozenset())
