"""The interface every dataset plug-in provides (``DataSource``), its splits, and helpers plug-ins share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from polymodal.config import DataConfig
from polymodal.data.references import Reference
from polymodal.modality import Modality

# Clips read to measure a dataset's log-mel statistics: enough for a stable median and spread.
STATISTICS_ITEMS = 256
QUANTILE_VALUES = 1_000_000  # values kept (evenly strided) for the quantiles
MIN_SCALE = 1e-3  # a silent dataset's spread: never divide by zero


@dataclasses.dataclass(frozen=True)
class Splits:
    """A dataset's splits and what the tokenizer and the evaluation need of them.

    Attributes:
        train, val, test: Datasets of ``polymodal.data.batch.Sample`` (or None for a sample that
            failed to load: skipped and counted by the collator).
        train_texts: every training caption (the BPE tokenizer is trained on these).
        heldout_labels: labels that never occur in training (scored apart: compositional zero-shot).
        train_labels: the labels of the training split.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    train_texts: list[str]
    heldout_labels: frozenset[int] = frozenset()
    train_labels: frozenset[int] = frozenset()


class DataSource(Protocol):
    """What a dataset plug-in provides. Built as ``cls(data: DataConfig, seed: int, **options)``.

    Attributes:
        references_for: the target modalities it has aligned references for (heads that learn
            from references need them; checked when a config is loaded).
        label_parser: how a caption names its item's label (``"forty two"`` -> 42), so a generated
            caption is right when it names the right label; None compares captions as text.
    """

    references_for: ClassVar[frozenset[Modality]]
    label_parser: Callable[[str], int | None] | None

    def load(self) -> Splits:
        """Read or make the data (cached by the plug-in as it sees fit)."""

    def source_text(self, target: Modality, text: str) -> str:
        """What a generator of ``target`` reads for ``text`` (a front end's normalisation)."""

    def references(self, splits: Splits, targets: Iterable[Modality]) -> dict[Modality, dict[int, Reference]]:
        """Per target modality, each training label's aligned reference."""

    def log_mel_statistics(self, splits: Splits, collator: Any) -> tuple[float, float]:
        """(center, scale) of the data's log-mel values, for heads that regress them."""

    def prompt_sets(self, modality: Modality) -> dict[str, Callable[[int], list[str]]]:
        """Zero-shot prompts naming a label, by set name (``""``: the main set); {} when labels have no names."""

    def evaluate_generation(
        self, run: Any, dataset: Dataset, generated: dict[str, Any], *, limit: int | None = None
    ) -> dict[str, dict]:
        """Its own figures of samples generated from ``dataset``'s captions (``evaluation.samples.
        Generated`` by task name), by section of the run's figures; {} when it has no judges."""

    def describe(self, splits: Splits) -> str:
        """A few lines of statistics for ``polymodal data``."""

    def write_preview(self, splits: Splits, out: Path) -> list[Path]:
        """Sample files a person can look at and listen to."""


def build_source(data: DataConfig, seed: int) -> DataSource:
    """The plug-in ``data.source`` names, with ``data.options`` as its settings (cheap: reads nothing)."""
    from polymodal.datasets import DATASETS

    return DATASETS.build({"name": data.source, **data.options}, data, seed, where="data.options")


def measure_log_mel_statistics(dataset: Dataset, collator: Any, *, max_items: int = STATISTICS_ITEMS) -> tuple[float, float]:
    """(median, interquartile range) of the log-mel values of the real frames of up to ``max_items``
    clips of ``dataset`` (in order), as the collator extracts them; (0, 1) when it has no audio."""
    values: list[torch.Tensor] = []
    seen = 0
    collator = collator.log_mel_view() if hasattr(collator, "log_mel_view") else collator
    for batch in DataLoader(dataset, batch_size=64, shuffle=False, collate_fn=collator):
        if seen >= max_items:
            break
        seen += batch.size
        if Modality.AUDIO in batch.inputs:
            mask = batch.masks[Modality.AUDIO] & batch.present[Modality.AUDIO][:, None]  # (B, F)
            values.append(batch.inputs[Modality.AUDIO][mask].flatten())
    if not values or not sum(v.numel() for v in values):
        return 0.0, 1.0
    flat = torch.cat(values).double()
    flat = flat[:: max(1, flat.numel() // QUANTILE_VALUES)]  # torch.quantile takes at most 2^24 values
    low, middle, high = torch.quantile(flat, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return middle, max(high - low, MIN_SCALE)


def identity_text(target: Modality, text: str) -> str:
    """A generator reads the text as written (stripped)."""
    return text.strip()
