"""The user's own data as a plug-in: a JSONL manifest (``polymodal.data.manifest``), one sample per
line, any subset of modalities, with an optional second manifest for evaluation.

A manifest knows nothing beyond its lines: captions are scored as text (exact match), generators
read the text as written, and it has no aligned references or zero-shot prompts. Its log-mel
statistics are measured on its own training clips. With ``synthetic_speech`` the training split
also holds its transcripts spoken by synthetic voices (``polymodal.data.synthetic_speech``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from polymodal.config import DataConfig
from polymodal.data.manifest import ManifestDataset
from polymodal.data.references import Reference
from polymodal.datasets import DATASETS
from polymodal.datasets.base import Splits, identity_text, measure_log_mel_statistics
from polymodal.errors import ConfigError
from polymodal.modality import Modality

# Share of a single manifest kept apart for validation/test when no val_manifest is given.
MANIFEST_HOLDOUT = 0.1


@DATASETS.register("manifest")
class ManifestSource:
    """``data.manifest`` (and ``data.val_manifest``) as splits.

    Args:
        data: the data config: the manifest paths and how images and audio are read.
        seed: draws the held-out share when there is no ``val_manifest``.
        holdout: the share of ``data.manifest`` kept apart for validation and test when
            ``data.val_manifest`` is not given.
        synthetic_speech: utterances of the training transcripts spoken by synthetic English
            voices added to the training split (0: none); validation and test stay the manifest's.
        synthetic_flite: the share of those utterances spoken by flite voices rather than espeak-ng
            ones (needs the system's flite: ``apt-get install flite``).
    """

    references_for: ClassVar[frozenset[Modality]] = frozenset()
    label_parser = None

    def __init__(
        self, data: DataConfig, seed: int, *, holdout: float = MANIFEST_HOLDOUT, synthetic_speech: int = 0, synthetic_flite: float = 0.0
    ) -> None:
        if not data.manifest:  # checked with the config, before anything is built
            raise ConfigError("data.manifest: needed when data.source=manifest (a JSONL file of samples), e.g. data.manifest=train.jsonl")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must lie in (0, 1), got {holdout}")
        if synthetic_speech < 0:
            raise ValueError(f"synthetic_speech must be >= 0 (utterances), got {synthetic_speech}")
        if not 0.0 <= synthetic_flite <= 1.0:
            raise ConfigError(f"data.options.synthetic_flite: the share of synthetic utterances spoken by flite voices, in [0, 1]; got {synthetic_flite}")
        if synthetic_flite and not synthetic_speech:
            raise ConfigError("data.options.synthetic_flite: a share of data.options.synthetic_speech's utterances, which is 0; set synthetic_speech too")
        self.data, self.seed, self.holdout, self.synthetic_speech = data, seed, holdout, synthetic_speech
        self.synthetic_flite = float(synthetic_flite)

    def load(self) -> Splits:
        full = ManifestDataset.from_config(self.data.manifest, self.data)
        if self.data.val_manifest:
            train, held = full, ManifestDataset.from_config(self.data.val_manifest, self.data)
            train_entries = full.entries
        else:  # a deterministic split of one manifest
            order = np.random.default_rng(self.seed).permutation(len(full))
            num_held = max(1, int(len(full) * self.holdout))
            train, held = Subset(full, order[num_held:].tolist()), Subset(full, order[:num_held].tolist())
            train_entries = [full.entries[i] for i in order[num_held:]]
        texts = [e["text"] for e in train_entries if isinstance(e.get("text"), str)]
        labels = frozenset(int(e["label"]) for e in train_entries if isinstance(e.get("label"), int) and e["label"] >= 0)
        if self.synthetic_speech:
            from polymodal.data.synthetic_speech import synthetic_speech_for  # loads espeak-ng: only when asked

            media = [full.media_path(e["audio"]) for e in train_entries if e.get("audio") is not None]
            spoken = synthetic_speech_for(
                train_entries, media, self.synthetic_speech, sample_rate=self.data.sample_rate, seed=self.seed, flite_share=self.synthetic_flite,
                speakers=self.data.speaker_norm,
            )  # fmt: skip
            train = ConcatDataset([train, spoken])
        return Splits(train=train, val=held, test=held, train_texts=texts, train_labels=labels)

    def source_text(self, target: Modality, text: str) -> str:
        return identity_text(target, text)

    def references(self, splits: Splits, targets) -> dict[Modality, dict[int, Reference]]:
        targets = ", ".join(map(str, targets))
        raise ConfigError(
            f"model.heads: the {targets} head(s) learn from aligned references, which a manifest does not have; "
            "pick heads that learn from the items themselves"
        )

    def log_mel_statistics(self, splits: Splits, collator: Any) -> tuple[float, float]:
        return measure_log_mel_statistics(splits.train, collator)

    def prompt_sets(self, modality: Modality) -> dict:
        return {}

    def evaluate_generation(self, run: Any, dataset: Dataset, generated: dict[str, Any], *, limit: int | None = None) -> dict[str, dict]:
        return {}

    def describe(self, splits: Splits) -> str:
        lines = [f"manifest {self.data.manifest}" + (f", evaluation manifest {self.data.val_manifest}" if self.data.val_manifest else "")]
        for name in ("train", "val"):
            split = getattr(splits, name)
            parts = split.datasets if isinstance(split, ConcatDataset) else [split]  # lines, then synthetic speech
            counts = Counter(m for part in parts for i in range(len(part)) for m in _modalities(part, i))
            have = ", ".join(f"{m}: {n}" for m, n in sorted(counts.items())) or "no readable item"
            lines.append(f"{name}: {len(split)} lines ({have})")
        return "\n".join(lines)

    def write_preview(self, splits: Splits, out: Path) -> list[Path]:
        from polymodal.evaluation.samples import write_dataset_preview

        return write_dataset_preview(splits.train, out, sample_rate=self.data.sample_rate)


def _modalities(split: Dataset, index: int) -> list[str]:
    """The modalities a manifest line (or a synthetic utterance) names, no media loaded."""
    if not isinstance(split, (Subset, ManifestDataset)):  # synthetic speech, held in memory
        sample = split[index]
        return [m.value for m in Modality if getattr(sample, m.value) is not None]
    dataset, row = (split.dataset, split.indices[index]) if isinstance(split, Subset) else (split, index)
    return [m.value for m in Modality if dataset.entries[row].get(m.value) is not None]
