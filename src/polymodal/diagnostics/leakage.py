"""The leakage ratio: how much of a private slot's (or query's) attention lands on tokens of other
modalities. Zero for a private text slot that reads only text; shared slots may read everything,
so for them the report gives how their attention divides between modalities instead.

Seed 003 (decoupling schemes 1 and 2) asks to monitor and penalise cross-modal attention leakage
of typed slots and query banks. The slots' attention follows Slot Attention (Locatello et al. 2020,
Object-Centric Learning with Slot Attention, arXiv:2006.15055) or Q-Former / Perceiver queries
(Li et al. 2023, BLIP-2, arXiv:2301.12597; Jaegle et al. 2021, Perceiver IO, arXiv:2107.14795).

A decoupler that reads tokens with typed slots exposes its attention as a ``TypedAttention``:
the (B, S, N) weights of each slot over the concatenated tokens of all modalities (a query bank
that reads only its own modality's tokens writes zeros over the others), each slot's type, and
each token's modality id (``_common.modality_ids`` builds them for a concatenated layout). Each
slot's row is normalised by its own total over the real tokens, so weights normalised over tokens
(cross-attention) and over slots (Slot Attention's softmax) both work. Rows with no mass (a slot
that attended only padding) are left out of the averages.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from polymodal.diagnostics._common import MODALITY_ORDER, check_modality_ids, float64
from polymodal.modality import Modality

# The type of a slot that may read every modality (seed 003's Q_share / S_share).
SHARED = "shared"


@dataclasses.dataclass(frozen=True)
class TypedAttention:
    """Attention of typed slots over the tokens of several modalities; what a decoupler exposes.

    Attributes:
        attention: (B, S, N) non-negative weights of slot s over token n, or (B, H, S, N) per head
            (averaged over heads).
        slot_types: S entries, a ``Modality`` for a private slot or ``SHARED``.
        token_modalities: (N,) or (B, N) int64 modality ids (indices into ``MODALITY_ORDER``).
        token_mask: (B, N) True at real tokens, or None when there is no padding.
    """

    attention: Tensor
    slot_types: tuple[Modality | str, ...]
    token_modalities: Tensor
    token_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.attention.ndim not in (3, 4):
            raise ValueError(f"attention must be (B, S, N) or (B, H, S, N), got shape {tuple(self.attention.shape)}")
        num_slots, num_tokens = self.attention.shape[-2:]
        if len(self.slot_types) != num_slots:
            raise ValueError(f"{len(self.slot_types)} slot_types for {num_slots} slots: give one type per slot")
        bad = [t for t in self.slot_types if not isinstance(t, Modality) and t != SHARED]
        if bad:
            raise ValueError(f"slot types must be Modality members or {SHARED!r}, got {bad}")
        if self.token_modalities.shape[-1] != num_tokens or self.token_modalities.ndim not in (1, 2):
            raise ValueError(f"token_modalities {tuple(self.token_modalities.shape)} must be (N,) or (B, N), N = {num_tokens}")
        check_modality_ids(self.token_modalities)
        if self.token_mask is not None and self.token_mask.shape != (self.attention.shape[0], num_tokens):
            raise ValueError(f"token_mask {tuple(self.token_mask.shape)} must be (B, N) = {(self.attention.shape[0], num_tokens)}")


@dataclasses.dataclass(frozen=True)
class Leakage:
    """The leakage ratio of each slot and each slot type.

    Attributes:
        mass: (S, M) float64 mean share of each slot's attention on each modality (columns in
            ``MODALITY_ORDER``; rows sum to 1), averaged over the batch.
        per_slot: (S,) float64 share on modalities other than the slot's own; NaN for shared slots.
        per_type: private type -> mean ``per_slot`` over that type's slots.
        shared_mass: modality -> mean share of the shared slots' attention on it (empty without
            shared slots).
    """

    mass: Tensor
    per_slot: Tensor
    per_type: dict[Modality, float]
    shared_mass: dict[Modality, float]


def modality_mass(typed: TypedAttention) -> Tensor:
    """(S, M) float64 share of each slot's attention on each modality, averaged over the batch.

    Columns follow ``MODALITY_ORDER``; each row sums to 1 (NaN for a slot with no attention on
    any real token in the whole batch).
    """
    attention = float64(typed.attention)
    if attention.ndim == 4:
        attention = attention.mean(dim=1)  # (B, H, S, N) -> (B, S, N): the heads' average weights
    batch, _, num_tokens = attention.shape
    ids = typed.token_modalities.to(attention.device, torch.int64).expand(batch, num_tokens)  # (B, N)
    onehot = torch.nn.functional.one_hot(ids, len(MODALITY_ORDER)).to(attention.dtype)  # (B, N, M)
    if typed.token_mask is not None:
        onehot = onehot * typed.token_mask.to(attention.device)[..., None]  # padding counts for no modality
    mass = torch.einsum("bsn,bnm->bsm", attention, onehot)  # (B, S, M) attention per modality
    total = mass.sum(dim=-1, keepdim=True)  # (B, S, 1)
    valid = total > 0
    share = torch.where(valid, mass / total.clamp(min=torch.finfo(mass.dtype).tiny), 0.0)  # (B, S, M)
    counts = valid.sum(dim=0)  # (S, 1) items where the slot attended real tokens
    return torch.where(counts > 0, share.sum(dim=0) / counts.clamp(min=1), float("nan"))  # (S, M)


def leakage_ratio(typed: TypedAttention) -> Leakage:
    """Share of each private slot's attention on other modalities' tokens, per slot and per type.

    Args:
        typed: the attention of the decoupler's slots (see ``TypedAttention``).

    Returns:
        A ``Leakage``; a private slot that reads only its own modality has ``per_slot`` 0.
    """
    mass = modality_mass(typed)  # (S, M)
    per_slot = torch.full((mass.shape[0],), float("nan"), dtype=mass.dtype, device=mass.device)  # (S,)
    for s, slot_type in enumerate(typed.slot_types):
        if slot_type != SHARED:
            per_slot[s] = 1 - mass[s, MODALITY_ORDER.index(slot_type)]
    per_type = {}
    for modality in MODALITY_ORDER:
        slots = [s for s, t in enumerate(typed.slot_types) if t == modality]
        if slots:
            per_type[modality] = float(per_slot[slots].nanmean())
    shared = [s for s, t in enumerate(typed.slot_types) if t == SHARED]
    shared_mass = {}
    if shared:
        shared_share = mass[shared].nanmean(dim=0)  # (M,)
        shared_mass = {m: float(shared_share[i]) for i, m in enumerate(MODALITY_ORDER)}
    return Leakage(mass=mass, per_slot=per_slot, per_type=per_type, shared_mass=shared_mass)
