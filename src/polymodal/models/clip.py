"""CLIP-style contrastive model over any set of modalities: one tower per modality, one shared backbone.

Each tower is encoder -> projector (to ``dim``) -> + modality-type embedding -> the ONE shared
transformer backbone, run over that modality's tokens alone (bidirectional, padding masked) ->
masked mean pool -> optional linear head -> L2 normalisation. Every pair of modalities present in a
batch gets its own symmetric InfoNCE term (``clip_image_text``, ``clip_audio_text``,
``clip_image_audio`` ...) over the items that carry both, with one shared learnable, clamped
temperature. The towers never read each other, so embeddings can be computed offline per modality
and searched later (``polymodal embed`` / ``polymodal search``).

References: Radford et al. 2021, Learning Transferable Visual Models From Natural Language
Supervision (CLIP), arXiv:2103.00020; a single transformer shared by the modalities' towers as in
Akbari et al. 2021, VATT (modality-agnostic variant), arXiv:2104.11178; several modality pairs
bound in one space as in Girdhar et al. 2023, ImageBind, arXiv:2305.05665.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import Config
from polymodal.data.batch import Batch
from polymodal.errors import ConfigError
from polymodal.losses.contrastive import DEFAULT_TILED_ABOVE
from polymodal.losses.temperature import DEFAULT_INIT_SCALE, DEFAULT_MAX_SCALE, LogitScale
from polymodal.modality import Modality
from polymodal.models.alignment import (
    MODALITY_INDEX,
    PAIRS,
    masked_mean,
    pair_losses,
    pair_name,
    parse_pair,
    source_pass,
    type_embedding,
)
from polymodal.models.output import StepOutput
from polymodal.models.parts import DataShapes, build_parts, check_parts

LOSS_PREFIX = "clip_"


class ClipModel(nn.Module):
    """Contrastive towers on one shared backbone. Wiring only: takes built parts (see ``build_clip``).

    Args:
        encoders: per modality, an encoder returning ``EncoderOutput`` (B, N, dim_m).
        projectors: per modality, ``forward(tokens, mask)`` (B, N, dim_m) -> (B, N', dim).
        backbone: a transformer ``forward(tokens, *, mask, positions)`` over (B, N, dim).
        dim: the backbone width D.
        embed_dim: width of the output embedding through a per-modality bias-free linear head
            (CLIP's projection); None embeds the pooled backbone output directly (width D).
        init_scale: the logit scale (1 / temperature) at initialisation.
        max_scale: the logit scale is clamped at this value (CLIP: 100).
        tiled_above: InfoNCE tiles its logits above this many pairs (see ``info_nce``); None never.
        tile_size: tile every InfoNCE at this size, whatever the batch; None lets ``tiled_above``
            decide.
        pairs: the modality pairs trained, e.g. ``["image_text", "audio_text"]``; None: every pair
            of the encoders' modalities.
        unique_labels: keep one item per label (>= 0) in each pair's InfoNCE, so two items of the
            same class are never each other's negatives (false negatives; with 10 one-digit numbers,
            a batch of 64 built-in samples holds about 20 of them). Unlabelled items always stay.
    """

    def __init__(
        self,
        encoders: dict[Modality, nn.Module],
        projectors: dict[Modality, nn.Module],
        backbone: nn.Module,
        dim: int,
        *,
        embed_dim: int | None = None,
        init_scale: float = DEFAULT_INIT_SCALE,
        max_scale: float = DEFAULT_MAX_SCALE,
        tiled_above: int | None = DEFAULT_TILED_ABOVE,
        tile_size: int | None = None,
        pairs: list[str] | None = None,
        unique_labels: bool = False,
    ) -> None:
        super().__init__()
        if set(encoders) != set(projectors):
            raise ValueError(f"encoders {sorted(encoders)} and projectors {sorted(projectors)} differ in modalities")
        have = ", ".join(map(str, encoders))
        if pairs is None:
            chosen = [p for p in PAIRS if p[0] in encoders and p[1] in encoders]
        else:
            chosen = [parse_pair(name) for name in pairs]
        for a, b in chosen:
            for modality in (a, b):
                if modality not in encoders:
                    raise ValueError(f"pair {pair_name(a, b)} needs a {modality} encoder; have {have}")
        if not chosen:
            raise ValueError(f"a CLIP model needs at least one pair of modalities; encoders: {have}")
        self.pairs = [p for p in PAIRS if p in chosen]  # canonical order, no duplicates
        self.encoders = nn.ModuleDict({m.value: e for m, e in encoders.items()})
        self.projectors = nn.ModuleDict({m.value: p for m, p in projectors.items()})
        self.backbone = backbone
        self.modality_embed = nn.Embedding(len(MODALITY_INDEX), dim)
        self.heads = nn.ModuleDict(
            {m.value: nn.Linear(dim, embed_dim, bias=False) for m in encoders} if embed_dim is not None else {}
        )
        self.logit_scale = LogitScale(init_scale=init_scale, max_scale=max_scale)
        self.dim = dim
        self.embed_dim = dim if embed_dim is None else embed_dim
        self.tiled_above = tiled_above
        self.tile_size = tile_size
        self.unique_labels = unique_labels
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.modality_embed.weight, std=0.02)
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=self.dim**-0.5)  # CLIP: width^-0.5 on the projections
        self.logit_scale.init_weights()

    @property
    def modalities(self) -> list[Modality]:
        return [Modality(key) for key in self.encoders]

    # ------------------------------------------------------------------ towers

    def embed(self, modality: Modality, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unit-norm embeddings of one modality's inputs.

        Args:
            modality: which tower.
            inputs: as the collator makes them (``Batch.inputs[modality]``): IMAGE (B, C, H, W),
                TEXT (B, L) ids, AUDIO (B, F, num_mels).
            mask: (B, L) or (B, F) bool, True on real tokens/frames; None: all real.

        Returns:
            (B, embed_dim) float32, unit L2 norm per row.
        """
        if modality.value not in self.encoders:
            raise ValueError(f"this model has no {modality} tower; it has {', '.join(self.encoders)}")
        encoder = self.encoders[modality.value]
        out = encoder(inputs) if mask is None or modality is Modality.IMAGE else encoder(inputs, mask)
        tokens = self.projectors[modality.value](out.tokens, out.mask)  # (B, N', D)
        tokens = tokens + type_embedding(self.modality_embed, modality, tokens)  # + (D,) type embedding
        if out.mask is not None and tokens.shape[1] == out.tokens.shape[1]:
            valid = out.mask  # (B, N) a per-token projector keeps the padding
        else:  # no padding, or learned queries that already read only the real tokens
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        pooled = masked_mean(source_pass(self.backbone, tokens, valid), valid)  # (B, D)
        if self.heads:
            pooled = self.heads[modality.value](pooled)  # (B, embed_dim)
        # fp32 island: these vectors make the InfoNCE logits, up to 100x their cosine; under bf16
        # autocast the norm and the cosines would lose two decimal digits.
        return F.normalize(pooled.float(), dim=-1)

    # ------------------------------------------------------------------ training

    def forward(self, batch: Batch) -> StepOutput:
        """One symmetric InfoNCE term per trained pair present in the batch.

        Returns:
            StepOutput with losses ``clip_<a>_<b>`` (() each, over the items carrying both a and b)
            and metrics ``logit_scale`` and ``clip_<a>_<b>_acc`` (in-batch a -> b top-1 accuracy).
        """
        paired = {m for pair in self.pairs for m in pair}
        embedded: dict[Modality, Tensor] = {}
        for modality in (m for m in self.modalities if m in paired and m in batch.inputs):  # a fixed order
            present = batch.present[modality]  # (B,)
            if not present.any():
                continue
            mask = batch.masks.get(modality)
            embedded[modality] = self.embed(
                modality, batch.inputs[modality][present], None if mask is None else mask[present]
            )  # (B_m, E): only the items that carry the modality
        scale = self.logit_scale()  # () shared by every pair
        losses, metrics = pair_losses(
            embedded,
            batch,
            self.pairs,
            scale,
            prefix=LOSS_PREFIX,
            unique_labels=self.unique_labels,
            tile_size=self.tile_size,
            tiled_above=self.tiled_above,
        )
        metrics = {"logit_scale": float(scale.detach()), **metrics}
        if not losses:
            trained = ", ".join(pair_name(a, b) for a, b in self.pairs)
            has = ", ".join(map(str, batch.inputs))
            raise ValueError(f"the batch has no item with both modalities of any trained pair ({trained}); it has {has}")
        return StepOutput(losses, metrics)


# ----------------------------------------------------------------------------- assembly


def clip_settings() -> dict[str, inspect.Parameter]:
    """The keyword-only settings of ``ClipModel``: what ``model.contrastive`` may hold."""
    params = inspect.signature(ClipModel.__init__).parameters
    return {k: p for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_clip_config(config: Config) -> None:
    """Validate a ``model.architecture: clip`` config before anything is built.

    Checks the encoders (a known name per modality, of that modality, at least two modalities),
    the projector and backbone specs, and ``model.contrastive`` (known keys, valid pairs, scales).

    Raises:
        ConfigError: naming the key and the valid choices.
    """
    model = config.model
    if len(model.encoders) < 2:
        raise ConfigError(
            f"model.encoders: a clip model needs at least two modalities, got {', '.join(model.encoders) or 'none'}; "
            "e.g. image: {name: cnn}, text: {name: text_embedding}"
        )
    check_parts(config)
    settings = clip_settings()
    for key in model.contrastive:
        if key not in settings:
            raise ConfigError(f"model.contrastive.{key}: unknown setting of the clip model; valid: {', '.join(settings)}")
    merged = {k: p.default for k, p in settings.items()} | dict(model.contrastive)
    for key in ("init_scale", "max_scale"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"model.contrastive.{key}: must be a positive number, got {value!r}")
    if merged["init_scale"] > merged["max_scale"]:
        raise ConfigError(
            f"model.contrastive.init_scale ({merged['init_scale']}) must not exceed max_scale ({merged['max_scale']})"
        )
    for key in ("embed_dim", "tiled_above", "tile_size"):
        value = merged[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"model.contrastive.{key}: must be a positive integer or null, got {value!r}")
    if not isinstance(merged["unique_labels"], bool):
        raise ConfigError(f"model.contrastive.unique_labels: expected true or false, got {merged['unique_labels']!r}")
    pairs = merged["pairs"]
    if pairs is not None:
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise ConfigError(f"model.contrastive.pairs: expected a non-empty list such as [image_text], got {pairs!r}")
        for name in pairs:
            try:
                a, b = parse_pair(str(name))
            except ValueError as exc:
                raise ConfigError(f"model.contrastive.pairs: {exc}") from None
            for modality in (a, b):
                if modality.value not in model.encoders:
                    raise ConfigError(f"model.contrastive.pairs: {name} needs model.encoders.{modality}")


def build_clip(config: Config, shapes: DataShapes) -> ClipModel:
    """Build the encoders, projectors and backbone named in ``config.model`` and wire a ``ClipModel``.

    Args:
        config: a config with ``model.architecture: clip``.
        shapes: the data side's ``DataShapes`` (image size, mel bins, text vocabulary).
    """

    check_clip_config(config)
    model = config.model
    parts = build_parts(config, shapes)
    try:
        return ClipModel(parts.encoders, parts.projectors, parts.backbone, model.dim, **model.contrastive)
    except ValueError as exc:
        raise ConfigError(f"model.contrastive: {exc}") from None
