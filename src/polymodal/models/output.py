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
        counts: for a term that is a mean over this batch's items, tokens or frames, () how many it
            averages over. Data-parallel training weighs each rank's term by its share of every
            rank's count, so that the gradient is the global mean (``distributed/global_mean.py``);
            a term not named (e.g. one already computed over every rank) is averaged per rank.
    """

    losses: dict[str, Tensor]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, Tensor] = dataclasses.field(default_factory=dict)
