"""What every decoupler shares: its output, the attention maps behind the leakage ratio, the gate
that opens the shared branch during training, and the input checks.

Seed 003's curriculum trains the private branches alone first, then opens the shared bridge
linearly: ``OpeningGate`` is 0 before ``start`` (30% of training by default), rises linearly and
is 1 from ``end`` (60%). The training loop calls ``set_progress(fraction)`` every step, and the gate
is a plain attribute recomputed from it, so resuming a run needs no extra state.

Leakage (seed 003, "cross-modal attention leakage ratio"): for the queries or slots private to
modality m, the share of their attention mass that lands on tokens of other modalities,

    leakage_m = sum_{q typed m, n of modality != m} A[q, n] / sum_{q typed m, n real} A[q, n]

summed over the items that hold modality m, where A is the attention (or slot assignment) map; 0
means the private queries read only their own modality. Items without modality m are left out: all
that m's queries take there is foreign, so the ratio would be 1 whatever they do and, as a loss,
give them no gradient. A type whose modality no item holds has no ratio.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from polymodal.modality import MODALITY_INDEX
from polymodal.modality import Modality

SHARED_TYPE = -1  # the query type of a shared query or slot
PADDING = -1  # the key modality of a padded key


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """Attention from typed queries (or slots) to modality-tagged keys, for leakage diagnostics.

    Attributes:
        weights: (B, Q, N) each query's attention over the N keys, averaged over heads; zero on
            padded keys. For slot attention, the assignment (softmax over slots) of each key.
        query_type: (Q,) long, the ``MODALITY_INDEX`` row of the modality a query is private to,
            -1 for a shared query.
        key_modality: (B, N) long, the ``MODALITY_INDEX`` row of each key's modality, -1 for padding.
    """

    weights: Tensor
    query_type: Tensor
    key_modality: Tensor


@dataclasses.dataclass(frozen=True)
class DecouplerOutput:
    """What a decoupler returns for one batch.

    Attributes:
        pooled: per modality present in the input, (B, D) the pooled state that replaces the
            masked mean and feeds the heads (rows of items lacking the modality are meaningless).
        shared: per modality, (B, D_s) the shared summary (cross-modal alignment acts on it).
        private: per modality, (B, D_p) the private summary.
        token_sets: named (B, S, D) query or slot outputs behind the summaries (``private_text``,
            ``shared_image`` ...); empty for a scheme without them.
        attention: named attention maps (see ``AttentionMap``); empty for a scheme without them.
        losses: named, unweighted auxiliary loss terms (0-dim tensors).
        stats: named floats to log (the gate, leakage per slot type ...).
    """

    pooled: dict[Modality, Tensor]
    shared: dict[Modality, Tensor]
    private: dict[Modality, Tensor]
    token_sets: dict[str, Tensor]
    attention: dict[str, AttentionMap]
    losses: dict[str, Tensor]
    stats: dict[str, float]


class OpeningGate:
    """A value in [0, 1] that follows training progress: 0 until ``start``, linear, 1 from ``end``.

    Args:
        start: training fraction where the gate starts to open.
        end: training fraction where it is fully open; ``end == start`` opens it at once.
    """

    def __init__(self, start: float, end: float) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= open_start ({start}) <= open_end ({end}) <= 1")
        self.start = start
        self.end = end
        self.value = 0.0

    def set_progress(self, fraction: float) -> None:
        """Recompute ``value`` for the training fraction ``fraction`` in [0, 1]."""
        if fraction < self.start:
            self.value = 0.0
        elif fraction >= self.end:
            self.value = 1.0
        else:
            self.value = (fraction - self.start) / (self.end - self.start)


class GatedSummaries:
    """Per-modality summaries of a private and a shared token set under the opening gate g:
    private = mean of the private set, shared = mean of the shared set (without gradient while g
    is 0: the closed shared branch must not train), pooled = norm(private + g * shared).

    Args:
        gate: the gate's current value.
        norm: the (B, D) -> (B, D) norm applied to the pooled state.
    """

    def __init__(self, gate: float, norm: nn.Module) -> None:
        self.gate = gate
        self.norm = norm
        self.pooled: dict[Modality, Tensor] = {}
        self.shared: dict[Modality, Tensor] = {}
        self.private: dict[Modality, Tensor] = {}
        self.token_sets: dict[str, Tensor] = {}

    def add(self, modality: Modality, own: Tensor, common: Tensor) -> None:
        """Summarise one modality's private (B, Q_p, D) and shared (B, Q_s, D) token sets."""
        if self.gate == 0:
            common = common.detach()
        self.private[modality], self.shared[modality] = own.mean(dim=1), common.mean(dim=1)  # (B, D) each
        self.pooled[modality] = self.norm(self.private[modality] + self.gate * self.shared[modality])
        self.token_sets[f"private_{modality}"], self.token_sets[f"shared_{modality}"] = own, common

    def output(
        self, attention: dict[str, AttentionMap], losses: dict[str, Tensor], stats: dict[str, float]
    ) -> DecouplerOutput:
        """The decoupler's output: these summaries with the given maps, losses and stats."""
        return DecouplerOutput(self.pooled, self.shared, self.private, self.token_sets, attention, losses, stats)


def leakage_ratios(attention: AttentionMap) -> dict[Modality, Tensor]:
    """Per private query type, the share of its attention mass on keys of other modalities.

    Args:
        attention: the map; shared queries (type -1) are skipped.

    Returns:
        per modality with private queries in the map and held by at least one item, () ratio in
        [0, 1] (0 where its queries hold no mass), differentiable, in at least float32.
    """
    weights = attention.weights.to(torch.promote_types(attention.weights.dtype, torch.float32))
    real = (attention.key_modality != PADDING).to(weights.dtype)  # (B, N)
    ratios: dict[Modality, Tensor] = {}
    for modality, index in MODALITY_INDEX.items():
        typed = attention.query_type == index  # (Q,)
        holds = (attention.key_modality == index).any(dim=1)  # (B,) items with modality m
        if not typed.any() or not holds.any():
            continue
        mass = weights[holds][:, typed] * real[holds][:, None, :]  # (B_m, Q_m, N), real keys only
        foreign = (attention.key_modality[holds] != index)[:, None, :]  # (B_m, 1, N)
        total = mass.sum()
        ratios[modality] = (mass * foreign).sum() / total.clamp(min=torch.finfo(weights.dtype).tiny)
    return ratios


def check_inputs(
    states: dict[Modality, Tensor], masks: dict[Modality, Tensor], modalities: tuple[Modality, ...], dim: int
) -> int:
    """Check a decoupler's inputs; return the batch size B.

    Raises:
        ValueError: naming the modality and what is wrong with its states or mask.
    """
    if not states:
        raise ValueError("a decoupler needs the states of at least one modality")
    if set(states) != set(masks):
        raise ValueError(f"states and masks must have the same modalities, got {sorted(states)} and {sorted(masks)}")
    batch = None
    for modality, tokens in states.items():
        if modality not in modalities:
            raise ValueError(f"{modality} is not one of this decoupler's modalities {[str(m) for m in modalities]}")
        mask = masks[modality]
        if tokens.ndim != 3 or tokens.shape[-1] != dim:
            raise ValueError(f"states[{modality}] must be (B, N, {dim}), got {tuple(tokens.shape)}")
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"masks[{modality}] must be bool (B, N) = {tuple(tokens.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if batch is not None and tokens.shape[0] != batch:
            raise ValueError(f"every modality must hold the same B items; {modality} has {tokens.shape[0]}, not {batch}")
        batch = tokens.shape[0]
    return batch


def both_present(masks: dict[Modality, Tensor], a: Modality, b: Modality) -> Tensor:
    """(B,) bool: the items that have at least one real token of both ``a`` and ``b``."""
    return masks[a].any(dim=1) & masks[b].any(dim=1)
