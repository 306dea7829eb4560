"""What flows from the data pipeline into a model: one raw ``Sample``, and a collated ``Batch``."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from polymodal.modality import Modality


@dataclasses.dataclass(frozen=True)
class ItemKey:
    """Which training item this is: its index in its dataset, and the pass over the data (epoch)
    it was drawn in. Augmentation draws from it (``augment.sample_rng``); feature caches key by the
    index. Training's sampler hands these to the datasets that read them (``data.keyed``)."""

    epoch: int
    index: int


@dataclasses.dataclass(frozen=True)
class Sample:
    """One item before collation. Absent modalities are None.

    Attributes:
        image: (C, H, W) float in [0, 1].
        text: the caption.
        audio: (T,) float waveform in [-1, 1] at the dataset's sample rate.
        label: the class of the item (the spoken number for the built-in data); -1 when unknown.
        key: the training item's key; None outside training (evaluation data is never augmented).
        speaker: who speaks the audio (a manifest line's ``speaker``), for ``data.speaker_norm``;
            None when unknown.
    """

    image: Tensor | None = None
    text: str | None = None
    audio: Tensor | None = None
    label: int = -1
    key: ItemKey | None = None
    speaker: str | None = None


@dataclasses.dataclass
class AlignedTargets:
    """What text -> audio or text -> image learns from (``references.py``): per item, its number in
    the reference voice or handwriting, and how much of it each source token covers.

    Attributes:
        ids: (B, L) the source text's token ids, ``[bos] ... [eos]``, padded; mask (B, L) True on real ids.
        durations: (B, L) float32, per token the log-mel frames (audio) or pixel columns (image) it
            covers; 0 on padding.
        values: the target: log-mel frames (B, F, num_mels), or images (B, 1, H, W) normalised.
        value_mask: (B, F) True on real frames; (B, W) all True for images.
        present: (B,) bool, False where the item's number has no reference (never in training).
    """

    ids: Tensor
    mask: Tensor
    durations: Tensor
    values: Tensor
    value_mask: Tensor
    present: Tensor

    def select(self, keep: Tensor) -> "AlignedTargets":
        """The items where ``keep`` (B,) is True."""
        return AlignedTargets(*(field[keep] for field in dataclasses.astuple(self)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "AlignedTargets":
        return AlignedTargets(*(field.to(device, non_blocking=non_blocking) for field in dataclasses.astuple(self)))


@dataclasses.dataclass
class Batch:
    """A collated batch; any subset of modalities.

    Attributes:
        inputs: per modality: IMAGE (B, C, H, W) normalised float; TEXT (B, L) token ids padded with
            the tokenizer's pad id; AUDIO (B, F, num_mels) log-mel frames padded with zeros, or
            (B, T) waveforms padded with zeros for an encoder that reads waveforms.
        masks: per modality, True where a token/frame/sample is real: TEXT (B, L), AUDIO (B, F) or
            (B, T). IMAGE has no mask (all pixels are real).
        present: per modality, (B,) bool: which items carry that modality at all (a manifest line may
            have only an image and a caption).
        labels: (B,) long, -1 when unknown.
        references: per target modality (AUDIO, IMAGE), the text -> audio / text -> image targets,
            when the collator has references (built-in data).
        indices: (B,) long, each item's index in its training dataset (``Sample.key``); None
            when the items carry no key (evaluation).
    """

    inputs: dict[Modality, Tensor]
    masks: dict[Modality, Tensor]
    present: dict[Modality, Tensor]
    labels: Tensor
    references: dict[Modality, AlignedTargets] = dataclasses.field(default_factory=dict)
    indices: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        indices = None if self.indices is None else self.indices.to(device)
        return Batch(
            move(self.inputs), move(self.masks), move(self.present), self.labels.to(device), move(self.references), indices
        )
