"""Hungarian matching of slots (or queries) between two runs or inputs, and of slots to modalities,
so that a permutation of exchangeable slots is not counted as drift.

Slots of Slot Attention and DETR-style queries are exchangeable: two runs (or two checkpoints of
one run) can learn the same slots in another order. Comparing slot i with slot i then reports
drift that is only relabelling. The optimal one-to-one assignment under a similarity (Kuhn 1955,
the Hungarian method; ``scipy.optimize.linear_sum_assignment``) removes it, as DETR's set loss
does for predictions (Carion et al. 2020, End-to-End Object Detection with Transformers,
arXiv:2005.12872). Seed 003 asks for it ("permutation consistency").

Similarity between slot i of ``a`` and slot j of ``b`` over the same B items:
- "cosine": the mean over items of the cosine of the two slot vectors; needs a shared feature
  space (two inputs through one model, or one run at two nearby steps).
- "cka": linear CKA of the two (B, D) slot representations; invariant to rotations of the feature
  space, so it also compares two independently trained runs (Kornblith et al. 2019,
  arXiv:1905.00414).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from polymodal.diagnostics._common import MODALITY_ORDER, float64
from polymodal.diagnostics.cka import cka_matrix
from polymodal.diagnostics.leakage import SHARED
from polymodal.modality import Modality

MEASURES = ("cosine", "cka")


@dataclasses.dataclass(frozen=True)
class SlotMatching:
    """The best one-to-one assignment of the slots of ``a`` to those of ``b``.

    Attributes:
        permutation: (S,) int64; slot i of ``a`` matches slot ``permutation[i]`` of ``b``, so
            ``b[..., permutation, :]`` lines ``b``'s slots up with ``a``'s.
        similarity: (S, S) float64 similarity of a's slot i (rows) and b's slot j (columns).
        matched_similarity: (S,) float64 ``similarity[i, permutation[i]]``.
    """

    permutation: Tensor
    similarity: Tensor
    matched_similarity: Tensor

    def accuracy(self, expected: Tensor | None = None) -> float:
        """Fraction of slots matched as ``expected`` (S,) says; the identity (no relabelling) by default."""
        if expected is None:
            expected = torch.arange(self.permutation.numel())
        if expected.shape != self.permutation.shape:
            raise ValueError(f"expected {tuple(expected.shape)} must be a permutation of shape {tuple(self.permutation.shape)}")
        return float((self.permutation == expected.to(self.permutation.device)).double().mean())


@dataclasses.dataclass(frozen=True)
class ModalityMatching:
    """The assignment of private slots to modalities, each modality taking as many slots as declared.

    Attributes:
        slots: (T,) int64 indices of the private (non-shared) slots, in order.
        assigned: T modalities, the one each of those slots was matched to.
        accuracy: fraction of those slots matched to their declared type.
    """

    slots: Tensor
    assigned: tuple[Modality, ...]
    accuracy: float


def slot_similarity(a: Tensor, b: Tensor, *, measure: str = "cosine") -> Tensor:
    """(S, S) float64 similarity of every slot of ``a`` to every slot of ``b``.

    Args:
        a: (B, S, D) slot vectors over B items (or (S, D), one item; "cosine" only).
        b: (B, S', D') the other set over the same items; D' may differ from D for "cka".
        measure: "cosine" or "cka" (see the module docstring).

    Returns:
        (S, S') similarities, rows a's slots and columns b's.
    """
    if measure not in MEASURES:
        raise ValueError(f"unknown slot similarity {measure!r}; valid: {', '.join(MEASURES)}")
    a, b = float64(a), float64(b)
    if a.ndim == 2 and b.ndim == 2:
        a, b = a[None], b[None]  # (S, D) -> (1, S, D): one item
    if a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be (B, S, D) slot vectors over the same B items")
    if measure == "cka":
        return cka_matrix(list(a.unbind(dim=1)), list(b.unbind(dim=1)))  # S representations (B, D) a side
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"cosine needs one feature space, got widths {a.shape[-1]} and {b.shape[-1]}; use measure='cka'")
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return torch.einsum("bsd,btd->st", a, b) / a.shape[0]  # (S, S') mean cosine over items


def hungarian_match(similarity: Tensor) -> SlotMatching:
    """The one-to-one assignment of rows to columns maximising the summed (S, S) ``similarity``."""
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be square (S, S), got {tuple(similarity.shape)}: match sets of equal size")
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity holds NaN or inf (a constant slot under 'cka'?); clean it before matching")
    similarity = float64(similarity)
    _, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)  # rows come back as 0..S-1
    permutation = torch.as_tensor(cols, dtype=torch.int64, device=similarity.device)  # (S,)
    matched = similarity.gather(1, permutation[:, None]).squeeze(1)  # (S,)
    return SlotMatching(permutation=permutation, similarity=similarity, matched_similarity=matched)


def match_slots(a: Tensor, b: Tensor, *, measure: str = "cosine") -> SlotMatching:
    """Match the slots of ``a`` to those of ``b`` (see ``slot_similarity`` for the shapes)."""
    return hungarian_match(slot_similarity(a, b, measure=measure))


def match_slots_to_modalities(mass: Tensor, slot_types: Sequence[Modality | str]) -> ModalityMatching:
    """Assign the private slots to modalities by their attention, as many per modality as declared.

    Args:
        mass: (S, M) share of each slot's attention on each modality (``leakage.modality_mass``).
        slot_types: S declared types, ``Modality`` or ``SHARED``; shared slots are not matched.

    Returns:
        The assignment maximising the summed attention share, and its agreement with the
        declared types (1 when every private slot reads mostly what it was declared to read,
        up to exchanging slots of one type).
    """
    if mass.ndim != 2 or mass.shape != (len(slot_types), len(MODALITY_ORDER)):
        raise ValueError(f"mass {tuple(mass.shape)} must be (S, M) = ({len(slot_types)}, {len(MODALITY_ORDER)})")
    private = [s for s, t in enumerate(slot_types) if t != SHARED]
    if not private:
        raise ValueError("every slot is shared: there is no private slot to match to a modality")
    declared = [slot_types[s] for s in private]
    # One column per declared place: a modality declared for k slots appears k times.
    columns = [m for m in MODALITY_ORDER for _ in range(declared.count(m))]
    column_ids = torch.tensor([MODALITY_ORDER.index(m) for m in columns])
    share = torch.nan_to_num(float64(mass)[private][:, column_ids.to(mass.device)])  # (T, T)
    _, cols = linear_sum_assignment(share.cpu().numpy(), maximize=True)  # rows come back as 0..T-1
    assigned = tuple(columns[c] for c in cols)
    accuracy = sum(a == d for a, d in zip(assigned, declared)) / len(declared)
    return ModalityMatching(slots=torch.tensor(private, dtype=torch.int64), assigned=assigned, accuracy=accuracy)
