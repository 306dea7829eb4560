"""Multi-head cross-attention: queries read a second token set (the context), with a key padding mask.

Two paths compute the same thing: ``forward`` goes through the self-attention's kernel chosen per
shape (``layers.attention.attend``: SDPA, or an explicit fp32 matmul-softmax for few keys in bf16
on a CPU, where SDPA's flash kernel is 4-11x slower forward + backward over a U-Net's 48-192
positions reading 28 condition tokens) and ``forward_with_weights`` writes the softmax out in the
inputs' dtype so the (B, H, Nq, Nk) attention weights can be returned for diagnostics.

Reference: Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762 (encoder-decoder
attention); query-key normalisation as in Dehghani et al. 2023, Scaling Vision Transformers to 22
Billion Parameters, arXiv:2302.05442.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.layers.attention import attend, init_attention_weights
from polymodal.layers.norms import RMSNorm

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale


@dataclasses.dataclass(frozen=True)
class CrossAttentionOutput:
    """What ``CrossAttention.forward_with_weights`` returns.

    Attributes:
        tokens: (B, Nq, D) attended queries, equal to ``forward``'s result.
        weights: (B, H, Nq, Nk) softmax weights before dropout; each row sums to one over the real
            keys and is exactly zero on padded keys (all zero where an item has no real key).
    """

    tokens: Tensor
    weights: Tensor


class CrossAttention(nn.Module):
    """Multi-head attention from queries (B, Nq, D) to a context (B, Nk, dim_context).

    Keys and values are projected straight from the context width to D, so the context needs no
    separate input projection.

    Args:
        dim: query and output width D.
        dim_context: context token width; ``dim`` when None.
        num_heads: H; ``dim`` must be divisible by it.
        qk_norm: RMSNorm each head's queries and keys (stabilises attention logits in training).
        bias: whether the projections have biases.
        dropout: dropout on the attention weights during training.
    """

    def __init__(
        self,
        dim: int,
        dim_context: int | None = None,
        *,
        num_heads: int = 4,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        dim_context = dim if dim_context is None else dim_context
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim_context, dim, bias=bias)
        self.v_proj = nn.Linear(dim_context, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def init_weights(self, *, std: float = INIT_STD, out_std: float = INIT_STD) -> None:
        init_attention_weights(self, std=std, out_std=out_std)

    def _heads(self, queries: Tensor, context: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project and split into heads: q (B, H, Nq, hd), k and v (B, H, Nk, hd)."""
        q = rearrange(self.q_proj(queries), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(context), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v_proj(context), "b n (h d) -> b h n d", h=self.num_heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    @staticmethod
    def _key_mask(mask: Tensor | None, context: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Turn a (B, Nk) key padding mask into an SDPA mask and a per-item "has any key" gate.

        An item whose keys are all padding would give a softmax over nothing (NaN, also in the
        backward pass). Such items attend to every key instead, and the gate then zeroes their
        weights and output, so they contribute exactly nothing and stay finite.

        Returns:
            allowed: (B, 1, 1, Nk) bool, True = may attend, or None for every key.
            gate: (B, 1, 1, 1) in the context dtype, 0 for items with no real key, or None.
        """
        if mask is None:
            return None, None
        if mask.dtype != torch.bool or mask.shape != context.shape[:2]:
            raise ValueError(
                f"mask must be bool of shape (B, Nk) = {tuple(context.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        has_key = mask.any(dim=-1)  # (B,)
        allowed = mask | ~has_key[:, None]  # empty items attend everywhere, then get gated to zero
        gate = has_key.to(context.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        return allowed[:, None, None, :], gate

    def forward(self, queries: Tensor, context: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """Attend from every query to the context through the kernel chosen for the shape (``attend``).

        Args:
            queries: (B, Nq, D).
            context: (B, Nk, dim_context).
            mask: (B, Nk) bool, True = real token; padded tokens are never attended. None = all real.

        Returns:
            (B, Nq, D).
        """
        q, k, v = self._heads(queries, context)
        allowed, gate = self._key_mask(mask, context)
        out = attend(q, k, v, allowed, dropout=self.dropout if self.training else 0.0)  # (B, H, Nq, hd)
        if gate is not None:
            out = out * gate.to(out.dtype)
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward_with_weights(
        self, queries: Tensor, context: Tensor, *, mask: Tensor | None = None
    ) -> CrossAttentionOutput:
        """Like ``forward``, with an explicit softmax whose weights are returned.

        Args:
            queries: (B, Nq, D).
            context: (B, Nk, dim_context).
            mask: (B, Nk) bool, True = real token. None = all real.

        Returns:
            CrossAttentionOutput with tokens (B, Nq, D) and weights (B, H, Nq, Nk).
        """
        q, k, v = self._heads(queries, context)
        allowed, gate = self._key_mask(mask, context)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, Nq, Nk)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        weights = scores.softmax(dim=-1)  # exp(-inf) = 0: padded keys get exactly zero weight
        if gate is not None:
            weights = weights * gate.to(weights.dtype)
        dropped = F.dropout(weights, p=self.dropout, training=self.training)
        out = dropped @ v  # (B, H, Nq, hd)
        tokens = self.o_proj(rearrange(out, "b h n d -> b n (h d)"))
        return CrossAttentionOutput(tokens=tokens, weights=weights)
