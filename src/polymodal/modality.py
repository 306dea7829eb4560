"""The modalities polymodal knows, and the shape glossary used in every docstring and comment.

Shape letters:
    B  batch            N  tokens            D  width (model dimension)
    H  heads            K  codebook size     S  slots
    M  modalities       E  experts           L  text length (token ids)
    T  audio samples    F  audio frames      C  image channels
"""

from __future__ import annotations

import enum


class Modality(str, enum.Enum):
    """A kind of input or output. Per-modality parts are keyed by ``Modality.X.value`` in ModuleDicts."""

    IMAGE = "image"
    TEXT = "text"
    AUDIO = "audio"

    def __str__(self) -> str:  # so f-strings and log lines read "image", not "Modality.IMAGE"
        return self.value

    @classmethod
    def parse(cls, name: str) -> "Modality":
        """The member called ``name``; a ValueError naming the valid choices otherwise."""
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {name!r}; valid: {valid}") from None


# Each modality's row in type embeddings and its id in per-token modality ids, fixed so checkpoints
# stay loadable when modalities are added.
MODALITY_INDEX = {m: i for i, m in enumerate(Modality)}
