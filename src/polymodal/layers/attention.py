"""Multi-head self-attention through ``F.scaled_dot_product_attention``, with RoPE, optional
query-key normalisation and an optional key/value cache.

References: Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762; query-key
normalisation as in Dehghani et al. 2023, Scaling Vision Transformers to 22 Billion Parameters,
arXiv:2302.05442 (RMSNorm over each head's queries and keys before the dot product).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.layers.kv_cache import KVCache
from polymodal.layers.norms import RMSNorm
from polymodal.layers.rope import RotaryAngles

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``.

    Args:
        dim: token width D.
        num_heads: H; ``dim`` must be divisible by it.
        qk_norm: RMSNorm each head's queries and keys (stabilises attention logits in training).
        bias: whether the projections have biases.
        dropout: dropout on the attention weights during training.
        layer_index: which slot of a shared ``KVCache`` this layer writes.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 4,
        qk_norm: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.layer_index = layer_index
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def init_weights(self, *, std: float = INIT_STD, out_std: float = INIT_STD) -> None:
        init_attention_weights(self, std=std, out_std=out_std)

    def forward(
        self,
        x: Tensor,
        *,
        rotary: RotaryAngles | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from every token of ``x`` to the cached tokens and to ``x`` itself.

        Args:
            x: (B, N, D) tokens.
            rotary: angles for the N new tokens' positions; no rotation when None.
            mask: (B, 1, N, N_kv) or broadcastable, bool, True = may attend; N_kv is the cached
                length plus N. None attends to every key.
            cache: when given, this call's keys/values are appended at ``cache.length``
                (the caller advances the length once all layers ran).

        Returns:
            (B, N, D).
        """
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.num_heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary.rotate(q), rotary.rotate(k)
        if cache is not None:
            kv = cache.update(self.layer_index, k, v)  # (B, H, N_kv, head_dim), cache dtype
            k, v = kv.keys.to(q.dtype), kv.values.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, N, head_dim)
        return self.o_proj(rearrange(out, "b h n d -> b n (h d)"))


def init_attention_weights(attn: nn.Module, *, std: float, out_std: float) -> None:
    """Truncated-normal q/k/v/o weights (``out_std`` for ``o_proj``), zero biases, unit qk-norm gains.

    Shared by self- and cross-attention, which name their projections alike.
    """
    for linear, s in ((attn.q_proj, std), (attn.k_proj, std), (attn.v_proj, std), (attn.o_proj, out_std)):
        nn.init.trunc_normal_(linear.weight, std=s, a=-3 * s, b=3 * s)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None:
            norm.init_weights()
