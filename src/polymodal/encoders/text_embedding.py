"""Text encoder: token embedding with learned positions, optionally followed by a small
bidirectional transformer (off by default: the shared backbone then does the sequence modelling).

References: the input embedding of GPT-2 (Radford et al. 2019) / BERT (Devlin et al. 2018,
arXiv:1810.04805); seed 000's "Tokenizer + Emb" text encoder. The optional layers are the
library's pre-norm ``TransformerBlock`` (Vaswani et al. 2017, arXiv:1706.03762), without RoPE
since positions are already added to the embeddings.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from polymodal.backbones.transformer import TransformerBlock, init_blocks
from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.layers.mlp import INIT_STD, swiglu_hidden_dim
from polymodal.layers.norms import RMSNorm
from polymodal.modality import Modality

MLP_RATIO = 4.0  # the optional layers' feed-forward width, as in Vaswani et al. 2017


@ENCODERS.register("text_embedding")
class TextEmbeddingEncoder(nn.Module):
    """Token ids (B, L) -> tokens (B, L, dim).

    Args:
        vocab_size: number of token ids.
        dim: token width D.
        max_len: longest text; the learned positions have this many rows.
        num_layers: transformer blocks after the embedding; 0 returns the embeddings (plus
            positions) as they are, with the parameters of the embedding-only encoder.
        num_heads: attention heads of those blocks.
        dropout: on the embedded tokens (and inside the optional blocks) while training.
    """

    modality = Modality.TEXT

    def __init__(
        self,
        vocab_size: int,
        *,
        dim: int = 128,
        max_len: int = 64,
        num_layers: int = 0,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.dropout = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.empty(1, max_len, dim))
        self.max_len = max_len
        self.num_layers = num_layers
        self.dim_out = dim
        if num_layers:  # no modules at all otherwise: embedding-only checkpoints keep their keys
            dim_hidden = swiglu_hidden_dim(dim, MLP_RATIO)
            self.blocks = nn.ModuleList(
                TransformerBlock(dim, num_heads=num_heads, dim_hidden=dim_hidden, dropout=dropout)
                for _ in range(num_layers)
            )
            self.final_norm = RMSNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) embeddings and positions; blocks GPT-2 style, residual outputs / sqrt(2 L)."""
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        nn.init.normal_(self.pos, std=INIT_STD)
        if self.num_layers:
            init_blocks(self.blocks)
            self.final_norm.init_weights()

    def forward_intermediates(self, ids: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Embed, then run the optional blocks with padded tokens masked out as keys.

        Args:
            ids: (B, L) token ids.
            mask: (B, L) bool, True on real tokens (padding at the end); None when all are real.

        Returns:
            EncoderIntermediates: ``output`` as ``forward`` (tokens (B, L, dim), the input mask);
            ``hidden``: [embeddings (B, L, dim)] without layers, else one (B, L, dim) residual
            stream per block.
        """
        if ids.shape[1] > self.max_len:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds the encoder's max_len={self.max_len}")
        embedded = self.embed(ids)  # (B, L, dim)
        tokens = self.dropout(embedded + self.pos[:, : ids.shape[1]])
        if not self.num_layers:
            return EncoderIntermediates(EncoderOutput(tokens, mask), [embedded])
        attn_mask = None
        if mask is not None:
            # Real queries never see padded keys; a padded query may attend itself, so that no
            # softmax row is fully masked (which would give NaN).
            self_only = torch.eye(ids.shape[1], dtype=torch.bool, device=ids.device)  # (L, L)
            attn_mask = (mask[:, None, :] | self_only)[:, None]  # (B, 1, L, L)
        hidden = []
        for block in self.blocks:
            tokens = block(tokens, rotary=None, mask=attn_mask, cache=None)
            hidden.append(tokens)
        return EncoderIntermediates(EncoderOutput(self.final_norm(tokens), mask), hidden)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Token ids (B, L) and optional mask (B, L) -> EncoderOutput with tokens (B, L, dim)."""
        return self.forward_intermediates(ids, mask).output
