"""Generation tasks: source modality -> target modality, e.g. image -> text. The task decides which
items of a batch it trains on and what its source and target are; the head of its target modality
does the rest (``polymodal.heads``).

A head that learns from aligned references (``reads_references``) gets the dataset's references
(``Batch.references[target]``: the source text as the reference says it, and the reference itself);
any other head gets the items' own source input and target modality.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from torch import Tensor, nn

from polymodal.data.batch import AlignedTargets, Batch
from polymodal.heads import Targets
from polymodal.modality import Modality
from polymodal.tasks import TASKS


@dataclasses.dataclass(frozen=True)
class TaskBatch:
    """The part of a batch a task trains on.

    Attributes:
        keep: (B,) bool, the batch's items it uses.
        inputs: the source inputs of the kept items (as ``Batch.inputs`` holds them); mask their
            mask, or None.
        target: ``Targets`` (the items' own target modality) or ``AlignedTargets`` (references).
        own_source: True when the source is the items' own input (not a reference text), so its
            states describe the items themselves.
        indices: (n,) the kept items' training-set indices when the source is their own and the
            batch has them (a cached encoder reads by them), else None.
    """

    keep: Tensor
    inputs: Tensor
    mask: Tensor | None
    target: Targets | AlignedTargets
    own_source: bool
    indices: Tensor | None = None


class GenerationTask(nn.Module):
    """``source`` -> ``target``, trained on a share of each batch's usable items.

    Args:
        source, target: the modalities (bound by the registry entry).
        dim, modalities: the backbone width and the modalities the model encodes (unused: a
            generation task has no weights of its own; the assembler checks ``source`` is encoded).
        fraction: the share of a batch's usable items the task trains on (the first ones of the
            shuffled batch): long-target tasks can take fewer items per step.
    """

    def __init__(self, source: Modality, target: Modality, dim: int, modalities: list[Modality], *, fraction: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        self.source, self.target, self.fraction = source, target, fraction

    def select(self, batch: Batch, *, reads_references: bool) -> TaskBatch | None:
        """The items this task trains on and their inputs, or None when the batch has none."""
        if reads_references:
            aligned = batch.references.get(self.target)
            if aligned is None:
                return None
            chosen = TaskBatch(aligned.present, aligned.ids, aligned.mask, aligned, own_source=False)
        elif self.source in batch.inputs and self.target in batch.inputs:
            keep = batch.present[self.source] & batch.present[self.target]
            target = Targets(batch.inputs[self.target], batch.masks.get(self.target))
            chosen = TaskBatch(keep, batch.inputs[self.source], batch.masks.get(self.source), target, own_source=True)
        else:
            return None
        keep = chosen.keep
        if self.fraction < 1.0:  # the first ceil(f * n) of the n usable items
            rank = keep.long().cumsum(0)  # (B,) 1-based rank among the usable items
            keep = keep & (rank <= math.ceil(self.fraction * int(keep.sum())))
        if not keep.any():
            return None
        mask = None if chosen.mask is None else chosen.mask[keep]
        indices = batch.indices[keep] if chosen.own_source and batch.indices is not None else None
        return TaskBatch(keep, chosen.inputs[keep], mask, chosen.target.select(keep), chosen.own_source, indices)


for _source, _target in (
    (Modality.IMAGE, Modality.TEXT),
    (Modality.AUDIO, Modality.TEXT),
    (Modality.TEXT, Modality.IMAGE),
    (Modality.TEXT, Modality.AUDIO),
):
    TASKS.add(f"{_source}_to_{_target}", functools.partial(GenerationTask, _source, _target))
