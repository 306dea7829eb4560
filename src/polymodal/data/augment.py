"""Per-sample data augmentation, deterministic per (seed, epoch, item index), off unless configured.

A run that stops and resumes must see the same augmented samples it would have seen without
stopping. So nothing here reads a global random state: each item's draws come from a generator
built by ``sample_rng(seed, epoch, index, stream=...)`` from numpy's ``SeedSequence`` (the seed as
entropy; stream, epoch and index as the spawn key, which gives statistically independent streams
for distinct keys). The same key always gives the same augmentation, whatever the batch, worker or
order the item is loaded in.

The transforms live in ``augment_audio`` (waveform chain and SpecAugment, with their papers) and
``augment_image``; ``augment_sample`` applies both to one raw ``Sample``, ``augment_samples`` to a
batch of them (the images warped together).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from polymodal.data.augment_audio import AudioAugmentSettings, augment_waveform, spec_augment
from polymodal.data.augment_image import ImageAugmentSettings, augment_images
from polymodal.data.batch import Sample
from polymodal.errors import ConfigError

# Independent draws per use of one (seed, epoch, index): the audio chain, the image chain, then
# SpecAugment and VTLP (applied later, by the collator, to log-mel frames). Appending is safe;
# reordering is not.
STREAMS = ("audio", "image", "spec_augment", "vtlp")

__all__ = [
    "AugmentSettings",
    "AudioAugmentSettings",
    "ImageAugmentSettings",
    "STREAMS",
    "augment_sample",
    "augment_samples",
    "sample_rng",
    "spec_augment",
]


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """The ``data.augment`` settings: one block per modality, everything off by default. Applied to
    the training split only (``data.keyed.TrainingItems``; SpecAugment in the collator).

    Attributes:
        noise_manifest: a JSONL manifest of noise recordings (``{"audio": "hum.wav"}`` lines) for
            the "clip" noise kind (``audio.noise_weights``' third odds); paths relative to it.
    """

    audio: AudioAugmentSettings = dataclasses.field(default_factory=AudioAugmentSettings)
    image: ImageAugmentSettings = dataclasses.field(default_factory=ImageAugmentSettings)
    noise_manifest: str | None = None

    def __post_init__(self) -> None:
        audio = self.audio
        if audio.noise_p > 0.0 and self.noise_manifest is None and sum(audio.noise_weights[:2]) == 0.0:
            raise ConfigError(
                "data.augment.audio.noise_weights asks for clip noise only; give data.augment.noise_manifest "
                "(a JSONL of noise recordings) or odds for white or pink noise"
            )


def sample_rng(seed: int, epoch: int, index: int, *, stream: str) -> np.random.Generator:
    """The generator for one item's augmentation.

    Args:
        seed: the run's seed.
        epoch: passes over the data so far (so an item is augmented afresh each epoch).
        index: the item's index in its dataset.
        stream: one of ``STREAMS``.

    Returns:
        A new generator; equal arguments give generators that draw equal numbers.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown augmentation stream {stream!r}; valid: {', '.join(STREAMS)}")
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    key = np.random.SeedSequence(seed, spawn_key=(STREAMS.index(stream), epoch, index))
    return np.random.default_rng(key)


def augment_sample(
    sample: Sample,
    settings: AugmentSettings,
    *,
    seed: int,
    epoch: int,
    index: int,
    sample_rate: int,
    noise_clips: Sequence[np.ndarray | Tensor] = (),
) -> Sample:
    """One raw sample, its image and waveform augmented (text and label untouched).

    Args:
        sample: image (C, H, W) in [0, 1] and/or audio (T,) in [-1, 1].
        settings: the ``data.augment`` block.
        seed, epoch, index: the item's key (see ``sample_rng``).
        sample_rate: the waveform's rate in Hz.
        noise_clips: (T_i,) noise recordings at ``sample_rate``, for clip noise.

    Returns:
        A new Sample; the input is not modified. An absent modality stays None.
    """
    return augment_samples([sample], settings, seed=seed, keys=[(epoch, index)], sample_rate=sample_rate, noise_clips=noise_clips)[0]


def augment_samples(
    samples: Sequence[Sample],
    settings: AugmentSettings,
    *,
    seed: int,
    keys: Sequence[tuple[int, int]],
    sample_rate: int,
    noise_clips: Sequence[np.ndarray | Tensor] = (),
) -> list[Sample]:
    """``augment_sample`` for many samples, their images warped together (``augment_images``);
    each comes out as ``augment_sample`` makes it alone.

    Args:
        samples: as ``augment_sample``'s.
        keys: (epoch, index) of each sample.
        settings, seed, sample_rate, noise_clips: as ``augment_sample``'s.
    """
    if len(samples) != len(keys):
        raise ValueError(f"need one key per sample, got {len(samples)} samples and {len(keys)} keys")
    images = [s.image for s in samples]
    if settings.image.active:
        warp = [i for i, image in enumerate(images) if image is not None]
        rngs = [sample_rng(seed, *keys[i], stream="image") for i in warp]
        for i, image in zip(warp, augment_images([images[i] for i in warp], settings.image, rngs)):
            images[i] = image
    out = []
    for sample, image, (epoch, index) in zip(samples, images, keys):
        audio = sample.audio
        if audio is not None and settings.audio.active:
            rng = sample_rng(seed, epoch, index, stream="audio")
            audio = augment_waveform(audio, settings.audio, rng, sample_rate=sample_rate, noise_clips=noise_clips)
        out.append(dataclasses.replace(sample, image=image, audio=audio))
    return out
