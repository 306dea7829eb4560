"""Q-Former / Perceiver-resampler input projector: a stack of blocks over learned queries.

Each pre-norm block updates the queries with self-attention among the queries, cross-attention to
the encoder tokens and a GELU MLP, each on a residual branch; a final RMSNorm follows the stack.
The backbone receives ``num_queries`` tokens whatever the number of encoder tokens N. With
``self_attention=False`` every query is processed independently of the others (a Perceiver
resampler whose latents do not read each other).

References: Li et al. 2023, BLIP-2 (the Q-Former: learned queries, self-attention, cross-attention
to frozen image features, feed-forward), arXiv:2301.12597; Alayrac et al. 2022, Flamingo (the
Perceiver Resampler), arXiv:2204.14198; Jaegle et al. 2021, Perceiver, arXiv:2103.03206.
"""

from __future__ import annotations

import math

import torch
from einops import repeat
from torch import Tensor, nn

from polymodal.layers.attention import SelfAttention
from polymodal.layers.cross_attention import INIT_STD, CrossAttention
from polymodal.layers.mlp import GeluMLP
from polymodal.layers.norms import RMSNorm
from polymodal.projectors import PROJECTORS
from polymodal.projectors.cross_attention import QUERY_INIT_STD, ProjectorOutput


class QFormerBlock(nn.Module):
    """``q + self_attn(norm(q))``, then ``q + cross_attn(norm(q), norm(context))``, then ``q + mlp(norm(q))``.

    Args:
        dim: query width D.
        dim_context: encoder token width.
        num_heads: heads of both attentions.
        dim_hidden: MLP hidden width.
        self_attention: whether the queries attend to each other first.
        qk_norm: RMSNorm queries and keys per head in both attentions.
        bias: biases in the attention projections and the MLP.
        dropout: dropout on attention weights, the MLP hidden layer and every residual branch.
    """

    def __init__(
        self,
        dim: int,
        dim_context: int,
        *,
        num_heads: int,
        dim_hidden: int,
        self_attention: bool = True,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(dim) if self_attention else None
        self.self_attn = (
            SelfAttention(dim, num_heads=num_heads, qk_norm=qk_norm, bias=bias, dropout=dropout)
            if self_attention
            else None
        )
        self.cross_attn_norm = RMSNorm(dim)
        self.context_norm = RMSNorm(dim_context)
        self.cross_attn = CrossAttention(
            dim, dim_context, num_heads=num_heads, qk_norm=qk_norm, bias=bias, dropout=dropout
        )
        self.mlp_norm = RMSNorm(dim)
        self.mlp = GeluMLP(dim, dim_hidden, bias=bias, dropout=dropout)
        self.residual_dropout = nn.Dropout(dropout)

    @property
    def num_branches(self) -> int:
        """Residual branches this block adds (for depth-scaled initialisation)."""
        return 3 if self.self_attn is not None else 2

    def init_weights(self, *, out_std: float) -> None:
        """N(0, 0.02) weights, ``out_std`` on the projections back into the residual stream."""
        for norm in (self.self_attn_norm, self.cross_attn_norm, self.context_norm, self.mlp_norm):
            if norm is not None:
                norm.init_weights()
        if self.self_attn is not None:
            self.self_attn.init_weights(std=INIT_STD, out_std=out_std)
        self.cross_attn.init_weights(std=INIT_STD, out_std=out_std)
        self.mlp.init_weights(std=INIT_STD, out_std=out_std)

    def forward(
        self, queries: Tensor, context: Tensor, *, mask: Tensor | None, attention: list[Tensor] | None = None
    ) -> Tensor:
        """Run the block.

        Args:
            queries: (B, Nq, D) residual stream of the queries.
            context: (B, N, dim_context) encoder tokens (un-normalised).
            mask: (B, N) bool, True = real token, or None.
            attention: when a list, the cross-attention uses the explicit softmax and appends its
                (B, H, Nq, N) weights here; when None, the SDPA path.

        Returns:
            (B, Nq, D).
        """
        if self.self_attn is not None and self.self_attn_norm is not None:
            queries = queries + self.residual_dropout(self.self_attn(self.self_attn_norm(queries)))
        normed, context = self.cross_attn_norm(queries), self.context_norm(context)
        if attention is None:
            read = self.cross_attn(normed, context, mask=mask)
        else:
            out = self.cross_attn.forward_with_weights(normed, context, mask=mask)
            attention.append(out.weights)
            read = out.tokens
        queries = queries + self.residual_dropout(read)
        return queries + self.residual_dropout(self.mlp(self.mlp_norm(queries)))


@PROJECTORS.register("qformer")
class QFormerProjector(nn.Module):
    """Encoder tokens (B, N, dim_in) -> (B, num_queries, dim_out) through ``num_layers`` blocks.

    Args:
        dim_in: encoder token width.
        dim_out: backbone width; must be divisible by ``num_heads``.
        num_queries: number of output tokens (BLIP-2 uses 32).
        num_layers: number of blocks.
        num_heads: attention heads per attention.
        mlp_ratio: MLP hidden width is ``mlp_ratio * dim_out``.
        self_attention: queries attend to each other in every block (Q-Former); off, each query
            reads the encoder tokens on its own.
        qk_norm: RMSNorm queries and keys per head.
        bias: biases in the attention projections and MLPs.
        dropout: dropout on attention weights, MLP hidden layers and residual branches.
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        num_queries: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        self_attention: bool = True,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, dim_out))
        self.blocks = nn.ModuleList(
            QFormerBlock(
                dim_out,
                dim_in,
                num_heads=num_heads,
                dim_hidden=int(mlp_ratio * dim_out),
                self_attention=self_attention,
                qk_norm=qk_norm,
                bias=bias,
                dropout=dropout,
            )
            for _ in range(num_layers)
        )
        self.final_norm = RMSNorm(dim_out)
        self.init_weights()

    def init_weights(self) -> None:
        """Unit-Gaussian queries; GPT-2 style N(0, 0.02) weights with the projections back into the
        residual stream scaled by 1/sqrt(number of residual branches), so the query stream's variance
        does not grow with depth (Radford et al. 2019). A no-op on the meta device."""
        nn.init.normal_(self.queries, std=QUERY_INIT_STD)
        branches = sum(block.num_branches for block in self.blocks)
        out_std = INIT_STD / math.sqrt(max(branches, 1))
        for block in self.blocks:
            block.init_weights(out_std=out_std)
        self.final_norm.init_weights()

    def _run(self, tokens: Tensor, mask: Tensor | None, attention: list[Tensor] | None) -> Tensor:
        queries = repeat(self.queries, "q d -> b q d", b=tokens.shape[0]).to(tokens.dtype)  # (B, Nq, dim_out)
        for block in self.blocks:
            queries = block(queries, tokens, mask=mask, attention=attention)
        return self.final_norm(queries)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """Resample the encoder tokens into ``num_queries`` tokens.

        Args:
            tokens: (B, N, dim_in) encoder tokens.
            mask: (B, N) bool, True = real token; padded tokens are never attended. None = all real.

        Returns:
            (B, num_queries, dim_out).
        """
        return self._run(tokens, mask, attention=None)

    def forward_with_attention(self, tokens: Tensor, mask: Tensor | None = None) -> ProjectorOutput:
        """Like ``forward`` (explicit softmax in the cross-attentions), also returning their weights.

        Args:
            tokens: (B, N, dim_in).
            mask: (B, N) bool or None.

        Returns:
            ProjectorOutput with tokens (B, num_queries, dim_out) and num_layers x (B, H, num_queries, N).
        """
        attention: list[Tensor] = []
        out = self._run(tokens, mask, attention=attention)
        return ProjectorOutput(tokens=out, attention=attention)
