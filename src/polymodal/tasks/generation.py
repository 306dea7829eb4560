"""Generation tasks: source modality -> target modality, e.g. image -> text. The task decides which
items of a batch it trains on and what its source and target are; the head of its target modality
does the rest (``polymodal.heads``).

A head that learns from aligned references (``reads_references``) gets the dataset's references
(``Batch.references[target]``: the source text as the reference says it, and the reference itself);
any other head gets the items' own source input and target modality.

Mixup (Zhang et al. 2018, mixup: Beyond Empirical Risk Minimization, arXiv:1710.09412), as an
option of a task whose source is images or audio: each training batch's source inputs are blended
with the same batch in a shuffled order, x = lam x_i + (1 - lam) x_perm(i), one lam ~ Beta(alpha,
alpha) per batch as in the paper, and the head's loss is lam times the loss of the item's own
target plus (1 - lam) times that of its partner's. Written here rather than taken from a library:
the peers (timm's ``Mixup``) mix one-hot class labels, not a caption's teacher-forced tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
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
        mixup: alpha of the Beta(alpha, alpha) mixing weight of mixup while training (0: none);
            an image or audio source only, whose inputs are numbers that blend.
    """

    def __init__(
        self, source: Modality, target: Modality, dim: int, modalities: list[Modality], *, fraction: float = 1.0, mixup: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
        if not mixup >= 0.0:
            raise ValueError(f"mixup must be >= 0 (0: none), got {mixup}")
        if mixup > 0.0 and source is Modality.TEXT:
            raise ValueError(f"mixup blends the source inputs, and a {source} source is token ids, which do not blend; mix a task from images or audio")
        self.source, self.target, self.fraction, self.mixup = source, target, fraction, mixup

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

    def mixed(self, chosen: TaskBatch) -> tuple[TaskBatch, Targets, float]:
        """Mixup of the items ``select`` chose: the blended batch, each item's partner's target and
        lam, the weight of the item's own. Draws lam and the partners from torch's generators, as
        dropout does, so a resumed run draws what the uninterrupted one did. The blended batch is
        no item's own source (``own_source`` False: its states are not the items' to align), and
        a cached encoder cannot read it (no ``indices``); a mask keeps every frame either item has."""
        lam = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
        partners = torch.randperm(chosen.inputs.shape[0], device=chosen.inputs.device)
        inputs = lam * chosen.inputs + (1.0 - lam) * chosen.inputs[partners]
        mask = None if chosen.mask is None else chosen.mask | chosen.mask[partners]
        blended = dataclasses.replace(chosen, inputs=inputs, mask=mask, own_source=False, indices=None)
        return blended, chosen.target.select(partners), lam


for _source, _target in (
    (Modality.IMAGE, Modality.TEXT),
    (Modality.AUDIO, Modality.TEXT),
    (Modality.TEXT, Modality.IMAGE),
    (Modality.TEXT, Modality.AUDIO),
):
    TASKS.add(f"{_source}_to_{_target}", functools.partial(GenerationTask, _source, _target))
