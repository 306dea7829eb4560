"""Live diagnostics: what training measures on its fixed validation probe batch (SPEC.md,
"Monitoring"; seed 003, "watch how modalities mix inside the shared model"). ``measure`` takes a
model with the any-to-any / CLIP trunk API (``encode``, ``backbone.forward_intermediates``) and
returns a ``LiveMeasurement``; the hook that calls it during training is ``live_hook.py``.

- Cross-modal CKA per backbone layer. Each modality's tokens go through the backbone alone (its
  source pass, ``models.sequence.source_pass``), the states of every layer are pooled per item by
  masked mean, and linear CKA is taken between every (modality, layer) pair of the SAME items
  (Kornblith et al. 2019, arXiv:1905.00414). The unbiased HSIC (Nguyen et al. 2021,
  arXiv:2010.15327) is used: at a probe of a few hundred items of width near the item count, the
  biased estimator rates two unrelated representations well above 0, which would read as mixing.
  Layer ``L0`` is what enters the backbone (encoder, projector, type embedding), ``Lk`` the
  residual stream after block k: the shared layers' cross-modal CKA against L0's says how much the
  backbone itself brings the modalities together.
- Effective rank (Roy & Vetterli 2007; RankMe, Garrido et al. 2023, arXiv:2210.02885) of each
  modality's pooled final states, centred (a shared offset is no spread), as a collapse detector.
- Gradient conflict (Yu et al. 2020, PCGrad, arXiv:2001.06782): cosines between the gradients
  that each loss term of the model sends to the backbone, on the first probe items.
- Expert usage per modality (Fedus et al. 2021, arXiv:2101.03961) of each mixture-of-experts
  block, from the routing records the backbone hands out (``layers.moe.MoEAux``).
- Leakage (seed 003) of every decoupler in the model (``polymodal.decoupling``), read from the
  typed attention maps it returns for the probe's final states.

A measure the model has no part for (no MoE, no decoupler) is simply absent from the result.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from polymodal.data.batch import Batch
from polymodal.diagnostics._common import MODALITY_ORDER
from polymodal.diagnostics.cka import cka_matrix
from polymodal.diagnostics.experts import ExpertUsage, usage_from_counts
from polymodal.diagnostics.gradients import GradientConflict, gradient_conflict
from polymodal.diagnostics.leakage import SHARED, Leakage, TypedAttention, leakage_ratio
from polymodal.diagnostics.rank import effective_rank
from polymodal.layers.moe import NO_MODALITY, MoEAux
from polymodal.modality import MODALITY_INDEX, Modality
from polymodal.models.sequence import masked_mean, real_positions, source_attention


@dataclasses.dataclass(frozen=True)
class ProbeStates:
    """The probe's items through the backbone, one modality at a time.

    Attributes:
        pooled: per modality, one (n, D) masked mean per layer (L0 = the backbone's input).
        final: per modality, (n, N_m, D) the backbone's final-normed output.
        masks: per modality, (n, N_m) bool, True on real tokens.
        routing: per mixture-of-experts block index, (M + 1, E) routed assignments per token
            modality (last row: no modality) and expert, summed over the modalities' passes.
    """

    pooled: dict[Modality, list[Tensor]]
    final: dict[Modality, Tensor]
    masks: dict[Modality, Tensor]
    routing: dict[int, Tensor]


@dataclasses.dataclass(frozen=True)
class LiveMeasurement:
    """One measurement of the probe batch.

    Attributes:
        num_items: n, the probe items every modality's states were taken on.
        modalities: the M modalities measured, in ``MODALITY_ORDER``.
        layers: the layer names, ``L0`` (input) to ``Lk`` (after block k).
        cka: (M * (k + 1), M * (k + 1)) float64 unbiased linear CKA between the pooled states of
            every (modality, layer), modality-major (image L0, image L1, ..., text L0, ...).
        effective_rank: per modality, of its pooled final states (centred).
        conflict: the gradient-conflict matrix of the loss terms on the backbone, or None.
        experts: per mixture-of-experts block index, the usage of its experts per modality.
        leakage: per decoupler attention map (``<module>.<map>``), its leakage ratios.
    """

    num_items: int
    modalities: tuple[Modality, ...]
    layers: tuple[str, ...]
    cka: Tensor
    effective_rank: dict[Modality, float]
    conflict: GradientConflict | None = None
    experts: dict[int, ExpertUsage] = dataclasses.field(default_factory=dict)
    leakage: dict[str, Leakage] = dataclasses.field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """The rows of ``cka``: ``image L0`` ..."""
        return [f"{m} {layer}" for m in self.modalities for layer in self.layers]

    def cross_modal(self) -> dict[tuple[Modality, Modality], list[float]]:
        """Per pair of modalities (in ``MODALITY_ORDER``), their CKA at each layer."""
        width = len(self.layers)
        out = {}
        for (i, a), (j, b) in itertools.combinations(enumerate(self.modalities), 2):
            out[(a, b)] = [float(self.cka[i * width + k, j * width + k]) for k in range(width)]
        return out

    def scalars(self) -> dict[str, float]:
        """Flat named scalars for ``metrics.jsonl`` and TensorBoard (see ``live_hook.py``)."""
        values = {}
        for (a, b), per_layer in self.cross_modal().items():
            values.update({f"cka/{a}-{b}/{layer}": v for layer, v in zip(self.layers, per_layer)})
        values.update({f"effective_rank/{m}": r for m, r in self.effective_rank.items()})
        if self.conflict is not None:
            names, cosine = self.conflict.names, self.conflict.cosine
            pairs = {f"conflict/{names[i]}/{names[j]}": float(cosine[i, j]) for i, j in itertools.combinations(range(len(names)), 2)}
            finite = [v for v in pairs.values() if math.isfinite(v)]
            values.update(pairs)
            values.update({"conflict/min": min(finite, default=math.nan), "conflict/mean": _mean(finite)})
            values.update({f"conflict_norm/{n}": float(g) for n, g in zip(names, self.conflict.norms)})
        for block, usage in self.experts.items():
            values.update({f"experts/block{block}/{m}/entropy": float(e) for m, e in zip(usage.modalities, usage.normalized_entropy)})
        for name, leak in self.leakage.items():
            values.update({f"leakage/{name}/{m}": v for m, v in leak.per_type.items()})
            values.update({f"shared_mass/{name}/{m}": v for m, v in leak.shared_mass.items()})
        return values

    def record(self) -> dict[str, Any]:
        """The whole measurement as plain JSON values (NaN as null), one line of ``diagnostics.jsonl``."""
        conflict = None
        if self.conflict is not None:
            conflict = {"names": list(self.conflict.names), "cosine": _plain(self.conflict.cosine), "norms": _plain(self.conflict.norms)}
        experts = [
            {"block": block, "modalities": [str(m) for m in u.modalities], "share": _plain(u.share),
             "normalized_entropy": _plain(u.normalized_entropy)}
            for block, u in self.experts.items()
        ]  # fmt: skip
        leakage = [
            {"name": name, "per_type": {str(m): _finite(v) for m, v in leak.per_type.items()},
             "shared_mass": {str(m): _finite(v) for m, v in leak.shared_mass.items()}}
            for name, leak in self.leakage.items()
        ]  # fmt: skip
        return {
            "items": self.num_items, "modalities": [str(m) for m in self.modalities], "layers": list(self.layers),
            "cka": _plain(self.cka), "effective_rank": {str(m): _finite(r) for m, r in self.effective_rank.items()},
            "gradient_conflict": conflict, "experts": experts, "leakage": leakage,
        }  # fmt: skip


def measure(model: nn.Module, probe: Batch, conflict_batch: Batch | None = None) -> LiveMeasurement:
    """Measure ``model`` on a probe batch (call it in eval mode; it changes no weight).

    Args:
        model: has ``encode(modality, inputs, mask)``, ``inputs.modalities`` and a ``backbone``
            with ``forward_intermediates``; ``forward(batch)`` returning named losses for the
            gradient conflict.
        probe: the probe items; every item must carry every modality the model encodes that the
            batch holds (the probe is drawn that way: ``training.probe.probe_indices``).
        conflict_batch: items for the gradient conflict (the probe's first few), or None to skip it.

    Returns:
        The measurement; CKA needs at least 4 items.
    """
    with torch.no_grad():
        states = probe_states(model, probe)
        modalities = tuple(states.pooled)
        reps = [layer for m in modalities for layer in states.pooled[m]]
        cka = cka_matrix(reps, unbiased=True)
        ranks = {m: effective_rank(masked_mean(states.final[m], states.masks[m]), center=True) for m in modalities}
        experts = {block: usage_from_counts(counts[: len(MODALITY_ORDER)]) for block, counts in states.routing.items()}
        leakage = decoupler_leakage(model, states)
    conflict = None
    if conflict_batch is not None:
        with torch.enable_grad():
            losses = model(conflict_batch).losses
            shared = [p for p in model.backbone.parameters() if p.requires_grad]
            conflict = gradient_conflict(losses, shared)
    layers = tuple(f"L{k}" for k in range(len(states.pooled[modalities[0]])))
    num_items = int(states.pooled[modalities[0]][0].shape[0])
    return LiveMeasurement(num_items, modalities, layers, cka, ranks, conflict, experts, leakage)


def probe_states(model: nn.Module, probe: Batch) -> ProbeStates:
    """Each encoded modality's source pass over the probe, with every layer's pooled states.

    Only items carrying every one of these modalities are kept, so the rows of all
    representations are the same items. A backbone with mixture-of-experts blocks also gets each
    token's modality and hands out its routing counts.
    """
    modalities = [m for m in MODALITY_ORDER if m in model.inputs.modalities and m in probe.inputs]
    if not modalities:
        raise ValueError(f"the probe holds none of the model's modalities {model.inputs.modalities} (it has {list(probe.inputs)})")
    keep = torch.stack([probe.present[m] for m in modalities]).all(dim=0)  # (B,) items with every modality
    backbone = model.backbone
    routed = bool(getattr(backbone, "moe_layers", None))
    pooled, final, masks, routing = {}, {}, {}, {}
    for modality in modalities:
        mask = probe.masks.get(modality)
        tokens, valid = model.encode(modality, probe.inputs[modality][keep], None if mask is None else mask[keep])
        aux = MoEAux()
        extra = {"modality_ids": torch.where(valid, MODALITY_INDEX[modality], NO_MODALITY), "aux": aux} if routed else {}
        out = backbone.forward_intermediates(tokens, mask=source_attention(valid), positions=real_positions(valid), **extra)
        pooled[modality] = [masked_mean(h, valid) for h in (tokens, *out.hidden)]  # (n, D) per layer
        final[modality], masks[modality] = out.output, valid
        for record in aux.records:  # none without mixture-of-experts blocks
            routing[record.layer] = routing.get(record.layer, 0) + record.routed
    return ProbeStates(pooled, final, masks, routing)


def decoupler_leakage(model: nn.Module, states: ProbeStates) -> dict[str, Leakage]:
    """Leakage of every attention map of every decoupler inside ``model``, on the probe's final
    states (what a decoupler reads). Empty for a model without decouplers."""
    from polymodal.decoupling import DECOUPLERS

    kinds = tuple(c for c in (DECOUPLERS.get(n) for n in DECOUPLERS.names()) if isinstance(c, type))
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, kinds)]
    results = {}
    for name, decoupler in found:
        present = [m for m in decoupler.modalities if m in states.final]
        if not present:
            continue
        out = decoupler({m: states.final[m] for m in present}, {m: states.masks[m] for m in present})
        for map_name, attention in out.attention.items():
            key = f"{name}.{map_name}" if len(found) > 1 else map_name
            results[key] = leakage_ratio(typed_attention(attention))
    return results


def typed_attention(attention: Any) -> TypedAttention:
    """A decoupler's ``AttentionMap`` (query types and key modalities as ``MODALITY_INDEX`` rows,
    -1 for shared queries and padded keys) as the ``TypedAttention`` the leakage ratio reads."""
    slot_types = tuple(SHARED if t < 0 else MODALITY_ORDER[t] for t in attention.query_type.tolist())
    real = attention.key_modality >= 0  # (B, N)
    return TypedAttention(attention.weights, slot_types, attention.key_modality.clamp(min=0), real)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _plain(values: Tensor) -> list:
    """A float tensor as nested lists, NaN as None (JSON has no NaN)."""
    if values.ndim == 0:
        return _finite(float(values))
    return [_plain(v) for v in values]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan
