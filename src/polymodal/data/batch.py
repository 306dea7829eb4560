"""What flows from the data pipeline into a model: one raw ``Sample``, and a collated ``Batch``."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from polymodal.modality import Modality


@dataclasses.dataclass(frozen=True)
class Sample:
    """One item before collation. Absent modalities are None.

    Attributes:
        image: (C, H, W) float in [0, 1].
        text: the caption.
        audio: (T,) float waveform in [-1, 1] at the dataset's sample rate.
        label: the class of the item (the spoken number for the built-in data); -1 when unknown.
    """

    image: Tensor | None = None
    text: str | None = None
    audio: Tensor | None = None
    label: int = -1


@dataclasses.dataclass
class SpeechTargets:
    """What text -> audio learns from (``aligned_speech.py``): per item, the words of its number
    read in the reference voice, and how many log-mel frames each of their tokens lasts.

    Attributes:
        ids: (B, L) token ids of the words, ``[bos] ... [eos]``, padded; mask (B, L) True on real ids.
        durations: (B, L) float32 frames per token, 0 on bos, eos and padding.
        log_mels: (B, F, num_mels) the reference clip's log-mel; frame_mask (B, F) True on real frames.
        present: (B,) bool, False where the item's number has no reference clip (never in training).
    """

    ids: Tensor
    mask: Tensor
    durations: Tensor
    log_mels: Tensor
    frame_mask: Tensor
    present: Tensor

    def select(self, keep: Tensor) -> "SpeechTargets":
        """The items where ``keep`` (B,) is True."""
        return SpeechTargets(*(field[keep] for field in dataclasses.astuple(self)))

    def to(self, device: torch.device | str) -> "SpeechTargets":
        return SpeechTargets(*(field.to(device, non_blocking=True) for field in dataclasses.astuple(self)))


@dataclasses.dataclass
class Batch:
    """A collated batch; any subset of modalities.

    Attributes:
        inputs: per modality: IMAGE (B, C, H, W) normalised float; TEXT (B, L) token ids padded with
            the tokenizer's pad id; AUDIO (B, F, num_mels) log-mel frames padded with zeros.
        masks: per modality, True where a token/frame is real: TEXT (B, L), AUDIO (B, F).
            IMAGE has no mask (all pixels are real).
        present: per modality, (B,) bool: which items carry that modality at all (a manifest line may
            have only an image and a caption).
        labels: (B,) long, -1 when unknown.
        speech: text -> audio targets, when the collator has reference speech (built-in data).
    """

    inputs: dict[Modality, Tensor]
    masks: dict[Modality, Tensor]
    present: dict[Modality, Tensor]
    labels: Tensor
    speech: SpeechTargets | None = None

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda d: {k: v.to(device, non_blocking=True) for k, v in d.items()}  # noqa: E731
        speech = None if self.speech is None else self.speech.to(device)
        return Batch(move(self.inputs), move(self.masks), move(self.present), self.labels.to(device), speech)
