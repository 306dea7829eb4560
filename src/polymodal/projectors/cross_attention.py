"""Cross-attention input projector: a fixed number of learned queries pool the encoder tokens.

Whatever the number of encoder tokens N, the backbone receives ``num_queries`` tokens: one
multi-head cross-attention from learned queries to the (normalised) encoder tokens, followed by an
output RMSNorm. Without positions in the encoder tokens the result does not depend on their order.

References: Lee et al. 2019, Set Transformer (pooling by multihead attention with learned seeds),
arXiv:1810.00825; Yu et al. 2022, CoCa (attentional pooler over image tokens), arXiv:2205.01917.
"""

from __future__ import annotations

import dataclasses

import torch
from einops import repeat
from torch import Tensor, nn

from polymodal.layers.cross_attention import INIT_STD, CrossAttention
from polymodal.layers.norms import RMSNorm
from polymodal.projectors import PROJECTORS

# Learned queries start as unit Gaussians, like the latents of Flamingo's Perceiver Resampler
# (Alayrac et al. 2022, arXiv:2204.14198), so distinct queries give distinct attention at init.
QUERY_INIT_STD = 1.0


@dataclasses.dataclass(frozen=True)
class ProjectorOutput:
    """What ``forward_with_attention`` of an attention projector returns.

    Attributes:
        tokens: (B, Nq, dim_out), equal to ``forward``'s result.
        attention: one (B, H, Nq, N) cross-attention weight tensor per layer, first layer first;
            rows sum to one over the real encoder tokens and are exactly zero on padded ones.
    """

    tokens: Tensor
    attention: list[Tensor]


@PROJECTORS.register("cross_attention")
class CrossAttentionProjector(nn.Module):
    """Encoder tokens (B, N, dim_in) -> (B, num_queries, dim_out) by learned-query cross-attention.

    Args:
        dim_in: encoder token width.
        dim_out: backbone width; must be divisible by ``num_heads``.
        num_queries: number of output tokens.
        num_heads: attention heads.
        qk_norm: RMSNorm each head's queries and keys.
        bias: biases in the attention projections.
        dropout: dropout on the attention weights during training.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        num_queries: int = 16,
        num_heads: int = 4,
        qk_norm: bool = False,
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, dim_out))
        self.context_norm = RMSNorm(dim_in)
        self.attn = CrossAttention(dim_out, dim_in, num_heads=num_heads, qk_norm=qk_norm, bias=bias, dropout=dropout)
        self.out_norm = RMSNorm(dim_out)
        self.init_weights()

    def init_weights(self) -> None:
        """Unit-Gaussian queries, N(0, 0.02) projections, unit norm gains. A no-op on meta."""
        nn.init.normal_(self.queries, std=QUERY_INIT_STD)
        self.context_norm.init_weights()
        self.attn.init_weights(std=INIT_STD, out_std=INIT_STD)
        self.out_norm.init_weights()

    def _inputs(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        queries = repeat(self.queries, "q d -> b q d", b=tokens.shape[0]).to(tokens.dtype)  # (B, Nq, dim_out)
        return queries, self.context_norm(tokens)  # (B, N, dim_in)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Pool the encoder tokens into ``num_queries`` tokens.

        Args:
            tokens: (B, N, dim_in) encoder tokens.
            mask: (B, N) bool, True = real token; padded tokens are never attended. None = all real.

        Returns:
            (B, num_queries, dim_out).
        """
        queries, context = self._inputs(tokens)
        return self.out_norm(self.attn(queries, context, mask=mask))

    def forward_with_attention(self, tokens: Tensor, mask: Tensor | None = None) -> ProjectorOutput:
        """Like ``forward`` (explicit softmax), also returning the attention weights.

        Args:
            tokens: (B, N, dim_in).
            mask: (B, N) bool or None.

        Returns:
            ProjectorOutput with tokens (B, num_queries, dim_out) and one (B, H, num_queries, N)
            weight tensor.
        """
        queries, context = self._inputs(tokens)
        out = self.attn.forward_with_weights(queries, context, mask=mask)
        return ProjectorOutput(tokens=self.out_norm(out.tokens), attention=[out.weights])
