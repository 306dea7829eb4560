"""Modality decouplers (seed 003): parts that turn each modality's backbone states into a private
and a shared summary, with named auxiliary losses and the attention maps behind the leakage ratio.
One registry, ``DECOUPLERS``; the fourth scheme, the modality-aware mixture of experts, replaces
the backbone's feed-forward instead (``layers/moe.py``, ``backbones/transformer.py``).

Built with wiring ``(dim, modalities)``, settings keyword-only. Every decoupler has
``forward(states, masks) -> DecouplerOutput`` with ``states[m]`` (B, N_m, D) and ``masks[m]``
(B, N_m) bool for the modalities present, ``dim_shared`` (the width of its shared summaries), and
``set_progress(fraction)``, which the training loop calls every step (through the model) so that
curricula inside the part follow training. In a model, the contrastive task embeds each modality
from the decoupler's ``shared`` summary (seed 003: InfoNCE on the shared outputs only) and adds the
decoupler's own losses and stats to the step's.
"""

from polymodal.registry import Registry

DECOUPLERS: Registry = Registry("decoupler")

from polymodal.decoupling import query_bank, shared_private, typed_slots  # noqa: E402,F401  (register parts)
from polymodal.decoupling.common import AttentionMap, DecouplerOutput, leakage_ratios  # noqa: E402

__all__ = ["DECOUPLERS", "AttentionMap", "DecouplerOutput", "leakage_ratios"]
