"""Diagnostics: measures of how modalities mix inside a shared model (SPEC.md, "Monitoring"; seed 003).

Pure functions of tensors, computed in float64 on the input's device, cheap enough for a probe
batch of a few hundred items during training:

- representation similarity: ``cka`` (linear / RBF, biased / unbiased), ``cka_matrix`` for
  heatmaps, ``MinibatchCKA`` over many batches, ``svcca`` and ``pwcca``;
- decoupling: ``leakage_ratio`` of typed slots' attention (``TypedAttention``), Hungarian matching
  of exchangeable slots (``match_slots``, ``match_slots_to_modalities``);
- optimisation and routing: ``gradient_conflict`` between losses, ``expert_usage`` per modality;
- collapse: ``effective_rank``.

``live.py`` measures a model's probe batch with these during training (``live_hook.py``, the
``train.diagnostics`` setting); it is imported on its own, as it reads models and layers.
"""

from polymodal.diagnostics._common import MODALITY_ORDER, modality_ids
from polymodal.diagnostics.cca import CCAResult, cca, pwcca, svcca
from polymodal.diagnostics.cka import cka, cka_matrix, feature_cka, gram_cka
from polymodal.diagnostics.experts import ExpertUsage, expert_usage, usage_from_counts
from polymodal.diagnostics.gradients import GradientConflict, gradient_conflict, gradient_cosine
from polymodal.diagnostics.hsic import feature_hsic, gram_hsic
from polymodal.diagnostics.kernels import linear_gram, rbf_gram
from polymodal.diagnostics.leakage import SHARED, Leakage, TypedAttention, leakage_ratio, modality_mass
from polymodal.diagnostics.matching import (
    ModalityMatching,
    SlotMatching,
    hungarian_match,
    match_slots,
    match_slots_to_modalities,
    slot_similarity,
)
from polymodal.diagnostics.minibatch_cka import MinibatchCKA
from polymodal.diagnostics.rank import effective_rank

__all__ = [
    "MODALITY_ORDER",
    "SHARED",
    "CCAResult",
    "ExpertUsage",
    "GradientConflict",
    "Leakage",
    "MinibatchCKA",
    "ModalityMatching",
    "SlotMatching",
    "TypedAttention",
    "cca",
    "cka",
    "cka_matrix",
    "effective_rank",
    "expert_usage",
    "feature_cka",
    "feature_hsic",
    "gradient_conflict",
    "gradient_cosine",
    "gram_cka",
    "gram_hsic",
    "hungarian_match",
    "leakage_ratio",
    "linear_gram",
    "match_slots",
    "match_slots_to_modalities",
    "modality_ids",
    "modality_mass",
    "pwcca",
    "rbf_gram",
    "slot_similarity",
    "svcca",
    "usage_from_counts",
]
