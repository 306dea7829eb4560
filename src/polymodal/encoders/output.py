"""What every encoder returns."""

from __future__ import annotations

import dataclasses

from torch import Tensor


@dataclasses.dataclass(frozen=True)
class EncoderOutput:
    """Attributes:
    tokens: (B, N, D) encoder tokens.
    mask: (B, N) bool, True on real tokens; None when every token is real.
    """

    tokens: Tensor
    mask: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class EncoderIntermediates:
    """Attributes:
    output: the encoder's final output (same as ``forward``).
    hidden: per stage/layer token states, each (B, N_i, D_i), first to last.
    """

    output: EncoderOutput
    hidden: list[Tensor]
