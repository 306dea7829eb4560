"""Decoder heads: what turns the shared backbone's states into one target modality, for training
(a named loss) and for generation. Registered in ``HEADS``; an any-to-any model holds one head per
target modality (``model.heads``), shared by every task with that target.

A head is built with one wiring argument, ``HeadWiring``, and keyword-only settings. It has:

* ``target``: the ``Modality`` it makes;
* ``reads_references``: True when it learns from the dataset's aligned references
  (``Batch.references[target]``, see ``polymodal.data.batch.AlignedTargets``) rather than from
  the items' own target modality;
* ``loss(trunk, source, source_mask, target) -> HeadOutput``: lays out ``[source][target]`` for
  the backbone (``trunk.run``) and returns its named, unweighted loss terms;
* ``generate(trunk, source, source_mask, **options)``: the target from projected source tokens;
  ``generation_options`` picks, from options a caller has, those a head's ``generate`` takes.

Heads that learn from aligned references: ``aligned_vq`` (images) and ``aligned_mel`` (speech), the
defaults, for the built-in data. Heads that learn from any data's items: ``lm`` (text),
``vq_codes`` (images: the item's own VQ codes drawn one after another, ``image_codes.py``),
``mas_vq`` (the same, each position also given the caption token its column draws, by monotonic
alignment search over the image's pixel columns, ``mas_codes.py``),
``flow_matching`` / ``flow_matching_latent`` (images: learnable queries, a connector and a
flow-matching DiT or U-Net, ``flow_image.py``), ``flow_matching_codes`` (the same on pixels,
its queries taught by the item's VQ codes, ``flow_image.py``) and ``mas_mel`` (speech: durations
by monotonic alignment search, ``mas_mel.py``). A head's main loss term is ``""`` (named after the
task) or a named term (the flow heads log ``<task>_flow_matching``).

``trunk`` is the model the head serves (``AnyToAnyModel``): ``trunk.run`` (the prefix-LM pass),
``trunk.source_states`` (a pass over a source alone), ``trunk.step`` (new target tokens reading a
KV cache), ``trunk.type_embedding`` and ``trunk.backbone`` (for ``new_cache``). Calling the
backbone through these keeps a mixture-of-experts backbone's per-token modalities right.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from torch import Tensor, nn

from polymodal.modality import Modality
from polymodal.models.shapes import DataShapes
from polymodal.registry import Registry

HEADS: Registry = Registry("head")

# The head a target modality gets when ``model.heads`` names none.
DEFAULT_HEADS = {Modality.TEXT: "lm", Modality.IMAGE: "aligned_vq", Modality.AUDIO: "aligned_mel"}


@dataclasses.dataclass(frozen=True)
class HeadWiring:
    """What the assembler gives every head.

    Attributes:
        dim: the backbone width D.
        shapes: the data's sizes.
        image_tokenizer: the run's trained image tokenizer (stage 1), for heads whose class sets
            ``needs_image_tokenizer``; None otherwise.
    """

    dim: int
    shapes: DataShapes
    image_tokenizer: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class HeadOutput:
    """What ``Head.loss`` returns.

    Attributes:
        hidden: (B, Ns + Nt, D) the backbone states of the pass; its first Ns positions are the
            source's (they never see the target, so they equal a pass over the source alone).
        losses: named, unweighted terms; ``""`` is the head's main term (named after the task).
        metrics: named scalar figures (token accuracy ...).
        counts: for a term that is a mean over tokens or frames, () how many it averages over
            (a term not named averages over the task's items); data-parallel training weighs
            each rank's term by it, so the gradient is the mean over every rank's tokens.
    """

    hidden: Tensor
    losses: dict[str, Tensor]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Targets:
    """A task's target when it is the items' own modality (not an aligned reference).

    Attributes:
        values: as ``Batch.inputs[target]`` holds them; mask as ``Batch.masks`` (None for images).
    """

    values: Tensor
    mask: Tensor | None

    def select(self, keep: Tensor) -> "Targets":
        return Targets(self.values[keep], None if self.mask is None else self.mask[keep])


def generation_options(head: nn.Module, **options: Any) -> dict[str, Any]:
    """The ``options`` that ``head.generate`` takes (a seeded ``generator``, sampling settings);
    the others are dropped, so one call site serves heads with different options."""
    accepted = inspect.signature(head.generate).parameters
    return {key: value for key, value in options.items() if key in accepted}


from polymodal.heads import aligned_codes, aligned_mel, flow_image, image_codes, mas_codes, mas_mel, text  # noqa: E402,F401  (register parts)

__all__ = ["DEFAULT_HEADS", "HEADS", "HeadOutput", "HeadWiring", "Targets", "generation_options"]
