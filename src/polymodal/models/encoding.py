"""The path every model's inputs take into the shared backbone: per modality an encoder, then a
projector to the backbone width, then the modality-type embedding (seed 000's M_img, M_txt, M_aud).

Reference: LLaVA-style projection of encoder tokens into the backbone width, Liu et al. 2023,
arXiv:2304.08485; a learned type embedding per modality as in VATT, Akbari et al. 2021,
arXiv:2104.11178.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.encoders.feature_cache import FeatureCache
from polymodal.modality import MODALITY_INDEX, Modality

TYPE_INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale


class ModalityEncoder(nn.Module):
    """Encoders and projectors per modality, and one modality-type embedding table.

    Args:
        encoders: per modality, ``forward(inputs, mask) -> EncoderOutput`` (B, N, D_m).
        projectors: per modality, ``forward(tokens, mask)`` (B, N, D_m) -> (B, N', dim).
        dim: the backbone width D.
    """

    def __init__(self, encoders: dict[Modality, nn.Module], projectors: dict[Modality, nn.Module], dim: int) -> None:
        super().__init__()
        if set(encoders) != set(projectors):
            raise ValueError(f"encoders {sorted(encoders)} and projectors {sorted(projectors)} differ in modalities")
        self.encoders = nn.ModuleDict({m.value: e for m, e in encoders.items()})
        self.projectors = nn.ModuleDict({m.value: p for m, p in projectors.items()})
        self.type_embed = nn.Embedding(len(MODALITY_INDEX), dim)
        # Per modality, a feature cache of a fully frozen encoder (``encoders.feature_cache``), set
        # by the training job; read only for training items (the batch carries their indices).
        self.caches: dict[Modality, FeatureCache] = {}
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.type_embed.weight, std=TYPE_INIT_STD)

    @property
    def modalities(self) -> list[Modality]:
        return [Modality(key) for key in self.encoders]

    def type_embedding(self, modality: Modality, like: Tensor) -> Tensor:
        """(D,) the type embedding row of ``modality``, in ``like``'s dtype and device."""
        return self.type_embed(torch.tensor(MODALITY_INDEX[modality], device=like.device)).to(like.dtype)

    def forward(
        self, modality: Modality, inputs: Tensor, mask: Tensor | None = None, indices: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Encoder -> projector -> + type embedding.

        Args:
            inputs: as the collator makes them (``Batch.inputs[modality]``); mask (B, L) or (B, F)
                True on real tokens or frames, or None when every one is real.
            indices: (B,) the items' indices in the training set, when they are training items of
                their own (then a cached encoder reads its cache).

        Returns:
            tokens (B, N, D) and mask (B, N) bool (True on real tokens).
        """
        if modality.value not in self.encoders:
            raise ValueError(f"this model has no {modality} encoder; it has {', '.join(self.encoders)}")
        cache = self.caches.get(modality)
        if cache is not None and indices is not None:
            out = cache(indices.tolist(), inputs, mask)
        else:
            out = self.encoders[modality.value](inputs, mask)
        tokens = self.projectors[modality.value](out.tokens, out.mask)
        tokens = tokens + self.type_embedding(modality, tokens)
        if out.mask is not None and tokens.shape[1] == out.tokens.shape[1]:
            return tokens, out.mask  # a per-token projector keeps the padding
        # No padding, or learned queries that already read only the real tokens.
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
