"""Contrastive alignment of every pair of modalities: a pooled, normalised embedding per modality
and one symmetric InfoNCE term per pair, with one learned temperature. The CLIP towers
(``models/clip.py``) and the any-to-any model both train it.

An embedding is the masked mean of the backbone's states over a modality's tokens alone, through a
bias-free linear head, L2-normalised. In an any-to-any model the source positions of a generation
task's pass hold exactly those states (sources never attend targets), so the task reuses them.
With a decoupler (``polymodal.decoupling``, seed 003), the states of every modality of the batch's
items go through it together, and the embedding is its ``shared`` summary instead of the mean:
InfoNCE acts on the shared outputs only (seed 003), never on the private ones; the decoupler's own
losses and stats join the step's. Its ``pooled`` summary (private plus gated shared) is left for
heads that read one; the model's generation heads read the token states themselves.

Reference: Radford et al. 2021, Learning Transferable Visual Models From Natural Language
Supervision (CLIP), arXiv:2103.00020; several modality pairs bound in one space as in Girdhar et
al. 2023, ImageBind, arXiv:2305.05665.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.data.batch import Batch
from polymodal.losses.contrastive import DEFAULT_TILED_ABOVE
from polymodal.losses.temperature import DEFAULT_INIT_SCALE, DEFAULT_MAX_SCALE, LogitScale
from polymodal.modality import Modality
from polymodal.models.alignment import PAIRS, pair_losses, pair_name, parse_pair
from polymodal.models.sequence import masked_mean
from polymodal.tasks import TASKS


@TASKS.register("contrastive")
class ContrastiveTask(nn.Module):
    """Embeddings per modality and their pairwise InfoNCE.

    Args:
        dim: the backbone width D.
        modalities: the modalities the model encodes.
        prefix: loss names are ``<prefix><pair>`` (``contrastive_image_text``, ``clip_audio_text``).
        embed_dim: width of the embeddings through a per-modality bias-free linear head (CLIP's
            projection); None embeds the pooled backbone state directly (width D).
        init_scale: the logit scale (1 / temperature) at initialisation.
        max_scale: the logit scale is clamped at this value (CLIP: 100).
        tiled_above: InfoNCE tiles its logits above this many pairs (see ``info_nce``); None never.
        tile_size: tile every InfoNCE at this size, whatever the batch; None lets ``tiled_above`` decide.
        pairs: the pairs trained, e.g. ``["image_text", "audio_text"]``; None: every pair of ``modalities``.
        unique_labels: keep one item per label (>= 0) in each pair's InfoNCE, so two items of the
            same class are never each other's negatives (false negatives). Unlabelled items stay.
    """

    def __init__(
        self,
        dim: int,
        modalities: list[Modality],
        prefix: str = "contrastive_",
        decoupler: nn.Module | None = None,
        *,
        embed_dim: int | None = 128,
        init_scale: float = DEFAULT_INIT_SCALE,
        max_scale: float = DEFAULT_MAX_SCALE,
        tiled_above: int | None = DEFAULT_TILED_ABOVE,
        tile_size: int | None = None,
        pairs: list[str] | None = None,
        unique_labels: bool = True,
    ) -> None:
        super().__init__()
        if decoupler is not None and {m for m in modalities} - set(decoupler.modalities):
            raise ValueError(f"the decoupler covers {list(map(str, decoupler.modalities))}, not every modality encoded")
        for key, value in (("embed_dim", embed_dim), ("tiled_above", tiled_above), ("tile_size", tile_size)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be a positive integer or null, got {value!r}")
        self.pairs = _chosen_pairs(pairs, modalities)
        paired = [m for m in Modality if any(m in pair for pair in self.pairs)]
        width = dim if decoupler is None else decoupler.dim_shared  # what is pooled: states, or shared summaries
        heads = {m.value: nn.Linear(width, embed_dim, bias=False) for m in paired} if embed_dim is not None else {}
        self.embed_heads = nn.ModuleDict(heads)
        self.logit_scale = LogitScale(init_scale=init_scale, max_scale=max_scale)
        self.decoupler = decoupler
        self.modalities = paired
        self.prefix, self.dim = prefix, width
        self.embed_dim = width if embed_dim is None else embed_dim
        self.tiled_above, self.tile_size, self.unique_labels = tiled_above, tile_size, unique_labels
        self.init_weights()

    def init_weights(self) -> None:
        for head in self.embed_heads.values():
            nn.init.normal_(head.weight, std=self.dim**-0.5)  # CLIP: width^-0.5 on the projections
        self.logit_scale.init_weights()

    def project(self, modality: Modality, pooled: Tensor) -> Tensor:
        """(B, D) pooled states -> (B, embed_dim) float32 unit-norm embeddings."""
        if self.embed_heads:
            pooled = self.embed_heads[modality.value](pooled)
        # fp32 island: these vectors make the InfoNCE logits, up to 100x their cosine; under bf16
        # autocast the norm and the cosines would lose two decimal digits.
        return F.normalize(pooled.float(), dim=-1)

    def embed(self, trunk, modality: Modality, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unit-norm embeddings (B, embed_dim) float32 of one modality's inputs, from a pass of
        ``trunk``'s backbone over that modality alone."""
        if modality not in self.modalities:
            raise ValueError(f"no contrastive {modality} embedding; embedded: {', '.join(map(str, self.modalities))}")
        tokens, valid = trunk.encode(modality, inputs, mask)
        with trunk.routing.of(modality):
            states = {modality: (trunk.source_states(tokens, valid), valid)}
        pooled, _, _ = self.summarise(states, {modality: torch.ones(len(valid), dtype=torch.bool, device=valid.device)})
        return self.project(modality, pooled[modality])

    def summarise(
        self, states: dict[Modality, tuple[Tensor, Tensor]], present: dict[Modality, Tensor]
    ) -> tuple[dict[Modality, Tensor], dict[str, Tensor], dict[str, float]]:
        """Per modality, one vector per item that carries it: the masked mean of its states, or the
        decoupler's shared summary of the items' states of every modality together.

        Args:
            states: per modality, ((B_m, N, D) source states, (B_m, N) mask) of the items where
                ``present[m]`` (B,) is True, in batch order.

        Returns:
            per modality (B_m, width); the decoupler's losses and stats (empty without one).
        """
        if self.decoupler is None:
            return {m: masked_mean(tokens, valid) for m, (tokens, valid) in states.items()}, {}, {}
        batch = len(next(iter(present.values())))
        full, masks = {}, {}
        for m, (tokens, valid) in states.items():  # back to all B items: an item lacking m has no real token
            full[m] = tokens.new_zeros(batch, *tokens.shape[1:]).index_put((present[m],), tokens)
            masks[m] = valid.new_zeros(batch, valid.shape[1]).index_put((present[m],), valid)
        out = self.decoupler(full, masks)
        return {m: out.shared[m][present[m]] for m in states}, out.losses, out.stats

    def forward(
        self, trunk, batch: Batch, states: dict[Modality, tuple[Tensor, Tensor]] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """One InfoNCE term per trained pair present in the batch (and a decoupler's own terms).

        Args:
            states: per modality, ((B_m, N, D) source states, (B_m, N) mask) over the items that
                carry it, already computed (a generation task's pass); the others are computed here.

        Returns:
            losses ``<prefix><pair>`` and metrics ``<prefix><pair>_acc`` and ``logit_scale``.
        """
        states, present = dict(states or {}), {}
        for modality in self.modalities:
            if modality not in batch.inputs or not batch.present[modality].any():
                continue
            present[modality] = batch.present[modality]  # (B,): only the items that carry the modality
            if modality not in states:
                mask = batch.masks.get(modality)
                tokens, valid = trunk.encode(modality, batch.inputs[modality][present[modality]], None if mask is None else mask[present[modality]])
                with trunk.routing.of(modality):
                    states[modality] = (trunk.source_states(tokens, valid), valid)
        states = {m: states[m] for m in present}
        pooled, losses, metrics = self.summarise(states, present) if states else ({}, {}, {})
        embedded = {m: self.project(m, vectors) for m, vectors in pooled.items()}
        scale = self.logit_scale()  # () shared by every pair
        pair_loss, pair_metrics = pair_losses(
            embedded, batch, self.pairs, scale, prefix=self.prefix, unique_labels=self.unique_labels,
            tile_size=self.tile_size, tiled_above=self.tiled_above,
        )
        return {**losses, **pair_loss}, {**metrics, **pair_metrics, "logit_scale": float(scale.detach())}

    def describe_pairs(self) -> str:
        return ", ".join(pair_name(a, b) for a, b in self.pairs)


def _chosen_pairs(names: list[str] | None, modalities: list[Modality]) -> list[tuple[Modality, Modality]]:
    """The pairs named (or every pair of ``modalities``), in ``PAIRS`` order; a ValueError naming
    what is missing otherwise."""
    have = ", ".join(map(str, modalities)) or "none"
    if names is None:
        chosen = [p for p in PAIRS if p[0] in modalities and p[1] in modalities]
    else:
        chosen = [parse_pair(str(name)) for name in names]
    for a, b in chosen:
        for modality in (a, b):
            if modality not in modalities:
                raise ValueError(f"pair {pair_name(a, b)} needs a {modality} encoder; have {have}")
    if not chosen:
        raise ValueError(f"contrastive alignment needs encoders of two modalities; have {have}")
    return [p for p in PAIRS if p in chosen]  # canonical order, no duplicates
