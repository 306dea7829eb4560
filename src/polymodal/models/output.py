"""What a trainable model returns from ``forward(batch)``."""

from __future__ import annotations

import dataclasses

from torch import Tensor


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """The result of one forward pass in training.

    Attributes:
        losses: named, unweighted scalar loss terms (e.g. ``image_to_text``, ``audio_to_text``).
            The training schedule weights and sums them.
        metrics: named scalar figures to log (token accuracy, perplexity ...), detached.
    """

    losses: dict[str, Tensor]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
