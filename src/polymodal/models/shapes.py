"""What the data side tells the assembler: sizes every part is wired with, never typed in a config."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TextSpecials:
    """Token ids the LM needs from the tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int


@dataclasses.dataclass(frozen=True)
class DataShapes:
    """The data's sizes, as the collator makes batches.

    Attributes:
        image_size: (H, W) of the collated images.
        num_mels: log-mel bands per audio frame.
        text: the tokenizer's vocabulary size and special ids.
        image_channels: C of the collated images.
        num_audio_frames: log-mel frames of the longest clip the collator keeps.
        log_mel_center, log_mel_scale: where the data's log-mel values sit and how widely they
            spread (a dataset measures them; ``polymodal.datasets``); a mel decoder regresses
            (x - center) / scale so its targets start near its zero output.
    """

    image_size: tuple[int, int]
    num_mels: int
    text: TextSpecials
    image_channels: int = 1
    num_audio_frames: int = 201
    log_mel_center: float = 0.0
    log_mel_scale: float = 1.0
