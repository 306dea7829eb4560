"""Typed slot attention (seed 003, scheme 2): slots private to each modality plus shared slots,
each carrying a type embedding, compete for the tokens by slot attention.

Slots: ``num_private_slots`` per modality and ``num_shared_slots``, each a learned initial state
plus its type's embedding. The module runs one slot attention per modality present, over that
modality's tokens, with every slot taking part: private[m] and pooled[m] then depend on modality m
alone, like the masked mean they replace, so an item's embedding for retrieval needs one modality
only and a cross-modal loss on ``shared`` compares two separately computed views.

Design choice: soft competition plus a penalty, not a hard mask. Slots of every type compete for
every token (the softmax over slots of Locatello et al.), so the slots private to text can win part
of an image's tokens; the leakage ratio of type m is the share of the assignment mass its slots
win on other modalities' tokens (``common.leakage_ratios``), logged per type and returned as the
``leakage`` loss (the mean over types). Why: seed 003 asks to measure the cross-modal leakage and
penalise it, which presumes it can be non-zero; under a hard mask it would be identically zero and
the diagnostic empty. The mass a foreign slot wins is information modality m's own slots lose, so
the penalty pushes each private type to specialise in its modality while the competition stays
the paper's.

Shared slots open after a private phase (``OpeningGate``, 0 before ``open_start``, linear to 1 at
``open_end``): while the gate is 0 they sit out of the competition (logit bias -inf), keep their
initial state, and ``shared`` carries no gradient; once it is g > 0 their logits get a bias of
log g (they win a share of the tokens that grows with g) and pooled = norm(private + g * shared).
Cross-modal InfoNCE on ``shared`` stays with the caller's contrastive task.

Reference: Locatello et al. 2020, Object-Centric Learning with Slot Attention, arXiv:2006.15055.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.decoupling import DECOUPLERS
from polymodal.decoupling.common import (
    PADDING,
    SHARED_TYPE,
    AttentionMap,
    DecouplerOutput,
    GatedSummaries,
    OpeningGate,
    check_inputs,
    leakage_ratios,
)
from polymodal.layers.norms import RMSNorm
from polymodal.layers.slot_attention import SlotAttention
from polymodal.modality import MODALITY_INDEX
from polymodal.modality import Modality

SLOT_INIT_STD = 1.0  # slots are layer-normed before every read, so their scale only sets the GRU's start
TYPE_INIT_STD = 0.02


@DECOUPLERS.register("typed_slots")
class TypedSlotDecoupler(nn.Module):
    """Private slots per modality and shared slots, typed, updated by slot attention.

    Args:
        dim: token and slot width D.
        modalities: the model's modalities; each gets ``num_private_slots`` private slots.
        num_private_slots: slots private to each modality.
        num_shared_slots: slots shared by all modalities.
        num_iterations: slot-attention rounds.
        mlp_ratio: the slot MLP's hidden width is ``mlp_ratio * dim``.
        open_start: training fraction where the shared slots start to open.
        open_end: training fraction where they are fully open.
    """

    def __init__(
        self,
        dim: int,
        modalities: tuple[Modality, ...] | list[Modality],
        *,
        num_private_slots: int = 4,
        num_shared_slots: int = 4,
        num_iterations: int = 3,
        mlp_ratio: float = 2.0,
        open_start: float = 0.3,
        open_end: float = 0.6,
    ) -> None:
        super().__init__()
        if num_private_slots < 1 or num_shared_slots < 1:
            raise ValueError(
                f"need at least one private and one shared slot, got {num_private_slots} and {num_shared_slots}"
            )
        self.dim = dim
        self.dim_shared = dim  # width of the shared summaries
        self.modalities = tuple(sorted(set(modalities), key=MODALITY_INDEX.__getitem__))
        self.gate = OpeningGate(open_start, open_end)
        # Plain lists, made into tensors where used: buffers would hold garbage after a meta-device
        # construction and ``to_empty``.
        self.types = [MODALITY_INDEX[m] for m in self.modalities for _ in range(num_private_slots)]
        self.types += [SHARED_TYPE] * num_shared_slots
        self.type_rows = [i for i in range(len(self.modalities)) for _ in range(num_private_slots)]
        self.type_rows += [len(self.modalities)] * num_shared_slots
        self.slots = nn.Parameter(torch.empty(len(self.types), dim))  # (S, D) learned initial states
        self.type_embed = nn.Parameter(torch.empty(len(self.modalities) + 1, dim))  # one row per type, shared last
        self.slot_attention = SlotAttention(dim, int(mlp_ratio * dim), num_iterations=num_iterations)
        self.out_norm = RMSNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.slots, std=SLOT_INIT_STD)
        nn.init.normal_(self.type_embed, std=TYPE_INIT_STD)
        self.slot_attention.init_weights()
        self.out_norm.init_weights()

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1]; recomputes the shared slots' gate."""
        self.gate.set_progress(fraction)

    def initial_slots(self) -> Tensor:
        """(S, D) each slot's initial state: its learned vector plus its type's embedding."""
        return self.slots + self.type_embed[torch.tensor(self.type_rows, device=self.slots.device)]

    def slot_type(self, device: torch.device) -> Tensor:
        """(S,) long: each slot's type, the ``MODALITY_INDEX`` row of its modality or -1 (shared)."""
        return torch.tensor(self.types, device=device)

    def forward(self, states: dict[Modality, Tensor], masks: dict[Modality, Tensor]) -> DecouplerOutput:
        """Slot attention over each modality's tokens.

        Args:
            states: per modality, (B, N_m, D) backbone states of the same B items.
            masks: per modality, (B, N_m) bool, True = real token (all False: the item lacks it).

        Returns:
            DecouplerOutput: pooled, shared and private (B, D) per modality present; token_sets
            ``private_<m>`` (B, num_private_slots, D) and ``shared_<m>`` (B, num_shared_slots, D);
            attention ``slots``: the assignment over every modality's tokens (B, S, M' * N_max);
            losses ``leakage``; stats ``gate`` and ``leakage_<m>``.
        """
        batch = check_inputs(states, masks, self.modalities, self.dim)
        present = [m for m in self.modalities if m in states]
        width = max(states[m].shape[1] for m in present)
        tokens = torch.cat([F.pad(states[m], (0, 0, 0, width - states[m].shape[1])) for m in present])  # (P*B, N, D)
        mask = torch.cat([F.pad(masks[m], (0, width - masks[m].shape[1])) for m in present])  # (P*B, N)
        gate = self.gate.value
        slot_type = self.slot_type(tokens.device)
        shared = slot_type == SHARED_TYPE  # (S,)
        bias = torch.where(shared, math.log(gate) if gate > 0 else float("-inf"), 0.0)  # (S,)
        # Pass p reads only its modality's private slots and the shared ones: the other slots'
        # last update is skipped. The initial slots go in as (S, D), shared by every item.
        own = torch.stack([(slot_type == MODALITY_INDEX[m]) | shared for m in present])  # (P, S)
        out = self.slot_attention(
            tokens,
            self.initial_slots().to(tokens.dtype),
            mask=mask,
            slot_bias=bias,
            frozen=shared if gate == 0 else None,
            needed=own.repeat_interleave(batch, dim=0),  # (P * B, S), passes stacked as the tokens
        )
        slots = rearrange(out.slots, "(p b) s d -> p b s d", b=batch)
        assignment = rearrange(out.assignment, "(p b) s n -> b s (p n)", b=batch)  # keys of every pass side by side
        key_modality = torch.cat(
            [
                F.pad(torch.where(masks[m], MODALITY_INDEX[m], PADDING), (0, width - masks[m].shape[1]), value=PADDING)
                for m in present
            ],
            dim=1,
        )  # (B, P * N), the keys side by side as in ``assignment``
        attention = AttentionMap(weights=assignment, query_type=slot_type, key_modality=key_modality)
        return self._output(present, slots, attention, gate)

    def _output(self, present: list[Modality], slots: Tensor, attention: AttentionMap, gate: float) -> DecouplerOutput:
        """Summaries, token sets, leakage loss and stats from the (P, B, S, D) slots of each pass."""
        summaries = GatedSummaries(gate, self.out_norm)
        slot_type = attention.query_type  # (S,)
        for p, modality in enumerate(present):
            own = slots[p][:, slot_type == MODALITY_INDEX[modality]]  # (B, S_m, D)
            summaries.add(modality, own, slots[p][:, slot_type == SHARED_TYPE])
        ratios = leakage_ratios(attention)
        stats = {"gate": gate, **{f"leakage_{m}": r.item() for m, r in ratios.items()}}
        # No ratio at all when no item holds any real token: then there is nothing to leak.
        leakage = torch.stack(list(ratios.values())).mean() if ratios else slots.new_zeros(())
        return summaries.output({"slots": attention}, {"leakage": leakage}, stats)
