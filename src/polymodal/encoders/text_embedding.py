"""Text encoder: token embedding with learned positions (the transformer that reads it is shared).

Reference: the input embedding of GPT-2 (Radford et al. 2019) / BERT (Devlin et al. 2018,
arXiv:1810.04805); seed 000's "Tokenizer + Emb" text encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.modality import Modality


@ENCODERS.register("text_embedding")
class TextEmbeddingEncoder(nn.Module):
    """Token ids (B, L) -> tokens (B, L, dim)."""

    modality = Modality.TEXT

    def __init__(self, vocab_size: int, *, dim: int = 128, max_len: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.empty(1, max_len, dim))
        self.max_len = max_len
        self.dim_out = dim
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward_intermediates(self, ids: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the encoder's max_len={self.max_len}")
        embedded = self.embed(ids)  # (B, L, dim)
        tokens = embedded + self.pos[:, : ids.shape[1]]
        return EncoderIntermediates(EncoderOutput(tokens, mask), [embedded])

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        return self.forward_intermediates(ids, mask).output
