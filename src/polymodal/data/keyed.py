"""The training split as training reads it: each item knows its key (the epoch it is drawn in and its
index), is augmented from that key alone, and carries the key on to the collator (SpecAugment) and
the model (feature caches).

Because an item's augmentation is a function of (seed, epoch, index) and nothing else
(``augment.sample_rng``), a run that stops and resumes sees exactly the samples it would have seen
without stopping, whichever worker process loads the item. The sampler (``training.sampler``) hands
``ItemKey``s to datasets whose ``reads_keys`` is True; other datasets get plain indices.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from torch.utils.data import Dataset

from polymodal.config import DataConfig
from polymodal.data.augment import AugmentSettings, augment_samples
from polymodal.data.batch import ItemKey, Sample
from polymodal.data.manifest import ManifestDataset
from polymodal.errors import DataError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

NOISE_CLIP_SECONDS = 30.0  # noise recordings are read up to this long (a clip is looped if shorter)


class TrainingItems(Dataset):
    """``dataset`` with every item keyed and (when ``augment`` asks) augmented.

    Args:
        dataset: the training split (``Sample`` or None items).
        augment: the ``data.augment`` settings; None or all-off keeps items as they are.
        seed: the run's seed (the augmentation's entropy).
        sample_rate: the waveforms' rate in Hz.
        noise_clips: (T_i,) noise recordings for the "clip" noise kind.
    """

    reads_keys = True

    def __init__(
        self,
        dataset: Dataset,
        *,
        augment: AugmentSettings | None = None,
        seed: int = 0,
        sample_rate: int = 16000,
        noise_clips: Sequence[np.ndarray] = (),
    ) -> None:
        self.dataset = dataset
        active = augment is not None and (augment.audio.active or augment.image.active)
        self.augment = augment if active else None
        self.seed, self.sample_rate, self.noise_clips = seed, sample_rate, list(noise_clips)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: ItemKey | int) -> Sample | None:
        """The item at ``key.index`` drawn in ``key.epoch`` (a plain index: epoch 0), augmented and keyed."""
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[ItemKey | int]) -> list[Sample | None]:
        """The items of one batch (the DataLoader asks for them together), their images augmented in
        one pass (``augment_samples``); each equals ``self[key]``."""
        keys = [key if isinstance(key, ItemKey) else ItemKey(0, int(key)) for key in keys]
        samples = [self.dataset[key.index] for key in keys]
        found = [i for i, sample in enumerate(samples) if sample is not None]
        if self.augment is not None and found:
            made = augment_samples(
                [samples[i] for i in found], self.augment, seed=self.seed, keys=[(keys[i].epoch, keys[i].index) for i in found],
                sample_rate=self.sample_rate, noise_clips=self.noise_clips,
            )  # fmt: skip
            for i, sample in zip(found, made):
                samples[i] = sample
        return [None if sample is None else dataclasses.replace(sample, key=key) for sample, key in zip(samples, keys)]


def load_noise_clips(data: DataConfig) -> list[np.ndarray]:
    """The audio of every line of ``data.augment.noise_manifest`` at ``data.sample_rate``; [] without one.

    Raises:
        DataError: the manifest has no readable audio.
    """
    path = data.augment.noise_manifest
    if path is None:
        return []
    clips = ManifestDataset.from_config(path, dataclasses.replace(data, max_audio_seconds=NOISE_CLIP_SECONDS))
    found = [clips[i] for i in range(len(clips)) if clips.entries[i].get(Modality.AUDIO.value) is not None]
    audio = [s.audio.numpy() for s in found if s is not None and s.audio is not None and s.audio.numel()]
    if not audio:
        raise DataError(f"data.augment.noise_manifest: {path} has no readable audio line; give lines such as {{\"audio\": \"noise.wav\"}}")
    logger.info("read %d noise clips (%.0f s) from %s", len(audio), sum(a.size for a in audio) / data.sample_rate, path)
    return audio
