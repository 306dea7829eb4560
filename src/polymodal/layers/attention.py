"""Multi-head self-attention with RoPE, optional query-key normalisation and an optional key/value
cache, and the attention kernel it runs, chosen per shape.

The kernel (``attend``): ``F.scaled_dot_product_attention`` (SDPA), except for short sequences in
bf16/fp16 on a CPU, where an explicit matmul-softmax runs in fp32. Measured on a 2-core AVX-512 BF16
CPU (``benchmarks/bench_train_step.py``, BENCHMARKS.md "Training throughput"): on the presets'
masked sequences of 10-53 tokens (head width 48), SDPA's CPU flash kernel takes 5-20x longer for
forward + backward in bf16 than the explicit path, whose two small matmuls cost little even in
fp32; in fp32 SDPA is as fast as the explicit path or faster, so it keeps SDPA. Both compute the
same function (tests/layers/test_attention.py: outputs and gradients within 1e-5 in fp32).

A boolean mask is turned into an additive float bias once per forward by the caller
(``attention_bias``), so the layers of a backbone share one bias instead of converting the mask each.

References: Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762; query-key
normalisation as in Dehghani et al. 2023, Scaling Vision Transformers to 22 Billion Parameters,
arXiv:2302.05442 (RMSNorm over each head's queries and keys before the dot product).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.layers.kv_cache import KVCache
from polymodal.layers.norms import RMSNorm
from polymodal.layers.rope import RotaryAngles

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale
# The explicit path serves at most this many keys: beyond it its (N, N_kv) fp32 scores stop being
# cheap against SDPA's tiled kernel (measured crossover, BENCHMARKS.md "Training throughput").
EXPLICIT_MAX_KEYS = 256
REDUCED_PRECISION = (torch.bfloat16, torch.float16)


def attention_bias(mask: Tensor | None) -> Tensor | None:
    """A boolean mask (True = may attend) as an additive float32 bias: 0 where allowed, -inf elsewhere.

    Built once per forward and shared by every layer; a float mask (already a bias) or None passes
    through unchanged.

    Args:
        mask: (B, 1, N, N_kv) or broadcastable, bool or float; or None.

    Returns:
        The same shape, float (float32 for a boolean mask), or None.
    """
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))


def uses_explicit_attention(query: Tensor, num_keys: int) -> bool:
    """Whether ``attend`` takes the explicit fp32 path for this query (see the module docstring)."""
    return query.device.type == "cpu" and query.dtype in REDUCED_PRECISION and num_keys <= EXPLICIT_MAX_KEYS


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax(q k^T / sqrt(head_dim) + bias)`` in float32: (B, H, N, N_kv); arguments as ``attend``'s."""
    scores = (q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2)  # (B, H, N, N_kv)
    if mask is not None:
        scores = scores + mask if mask.is_floating_point() else scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout: float = 0.0) -> Tensor:
    """``attention_weights(q, k, mask) v`` written out, computed in float32; arguments and shapes as
    ``attend``'s, the result in the dtype of ``q``."""
    # fp32 island: bf16 scores (8 significant bits) would shift attention weights by percents; on
    # short sequences the fp32 matmuls cost little. Autocast is off so they stay fp32.
    with torch.autocast(q.device.type, enabled=False):
        weights = attention_weights(q, k, mask)
        if dropout > 0.0:
            weights = F.dropout(weights, dropout)
        return (weights @ v.float()).to(q.dtype)  # (B, H, N, head_dim)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, dropout: float = 0.0) -> Tensor:
    """Scaled dot-product attention through the kernel chosen for this shape and dtype.

    Args:
        q: (B, H, N, head_dim); k, v: (B, H, N_kv, head_dim).
        mask: (B, 1, N, N_kv) or broadcastable, bool (True = may attend) or an additive float bias;
            or None.
        dropout: dropout probability on the attention weights (0 outside training).

    Returns:
        (B, H, N, head_dim).
    """
    if uses_explicit_attention(q, k.shape[-2]):
        return explicit_attention(q, k, v, mask, dropout=dropout)
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        # SDPA takes a float mask only in the query's dtype; given the float32 bias with fp64 (or
        # bf16) queries, its CPU kernel reads it wrongly on some CPUs without a word (measured on an
        # AVX2 EPYC: outputs off by up to 3 on a causal mask). 0 and -inf are exact in every dtype.
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the tokens a pass keeps sit in its padded (B, N) grid, so that per-token layers
    (projections, norms, feed-forward) run on those T tokens only and just attention sees the grid.

    Attributes:
        index: (P,) long, row-major positions ``b * N + n``: the T kept tokens first, in order, then
            any positions of the grid carried only to round P up (``of``'s ``multiple``).
        batch: B.
        length: N.
        count: T, the kept tokens: the first T of ``index``, whose results ``unpack`` returns.
    """

    index: Tensor
    batch: int
    length: int
    count: int

    @classmethod
    def of(cls, keep: Tensor, multiple: int = 1) -> TokenLayout:
        """The layout of the True entries of ``keep`` (B, N) bool.

        ``multiple`` > 1 rounds the packed count up to a multiple of it (at most B N) with some of
        the other positions, whose results ``unpack`` drops: the per-token matmuls then see a few
        shapes that repeat from batch to batch instead of a new one each batch, and oneDNN builds a
        kernel for each new shape (about 2 ms per bf16 matmul with AMX, BENCHMARKS.md).
        """
        flat = keep.flatten()
        index = flat.nonzero().squeeze(1)
        count = index.numel()
        padded = min(-(-count // multiple) * multiple, flat.numel())
        if padded > count:
            extra = (~flat).nonzero().squeeze(1)[: padded - count]
            index = torch.cat([index, extra])
        return cls(index, keep.shape[0], keep.shape[1], count)

    @property
    def fraction(self) -> float:
        """T / (B N): the share of the grid kept."""
        return self.count / max(self.batch * self.length, 1)

    def pack(self, grid: Tensor) -> Tensor:
        """(B, N, ...) -> (P, ...): the kept tokens, row-major, then the rounding positions."""
        return grid.flatten(0, 1).index_select(0, self.index)

    def unpack(self, tokens: Tensor) -> Tensor:
        """(P, ...) -> (B, N, ...): the kept tokens in their places, zeros elsewhere."""
        grid = tokens.new_zeros((self.batch * self.length, *tokens.shape[1:]))  # (B N, ...)
        kept = slice(0, self.count)
        return grid.index_copy(0, self.index[kept], tokens[kept]).unflatten(0, (self.batch, self.length))


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
        layout: TokenLayout | None = None,
    ) -> Tensor:
        """Attend from every token of ``x`` to the cached tokens and to ``x`` itself.

        Args:
            x: (B, N, D) tokens, or (T, D) with a ``layout``: the tokens it keeps of a (B, N) grid.
            rotary: angles for the N new tokens' positions (B, 1, N, head_dim / 2); no rotation
                when None.
            mask: (B, 1, N, N_kv) or broadcastable, bool (True = may attend) or an additive float
                bias (``attention_bias``); N_kv is the cached length plus N. None attends to every key.
            cache: when given, this call's keys/values are appended at ``cache.length``
                (the caller advances the length once all layers ran).
            layout: where the T tokens of ``x`` sit in the (B, N) grid; the tokens it leaves out
                read as zeros and their outputs are dropped, so none may be attended by another.

        Returns:
            (B, N, D), or (T, D) with a layout.
        """
        # One (D -> 3D) matmul for q, k and v: fewer, larger kernels in both directions.
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # (3D, D)
        bias = None if self.q_proj.bias is None else torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(x, weight, bias)  # (B, N, 3D) or (T, 3D)
        if layout is not None:
            qkv = layout.unpack(qkv)  # (T, 3D) -> (B, N, 3D), zeros where left out
        width = qkv.shape[-1] // 3
        qk = rearrange(qkv[..., : 2 * width], "b n (two h d) -> b (two h) n d", two=2, h=self.num_heads)
        v = rearrange(qkv[..., 2 * width :], "b n (h d) -> b h n d", h=self.num_heads)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.chunk(2, dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        if rotary is not None:
            qk = rotary.rotate(qk)  # queries and keys in one call (half the element-wise kernels)
        q, k = qk.chunk(2, dim=1)  # (B, H, N, head_dim) each
        if cache is not None:
            kv = cache.update(self.layer_index, k, v)  # (B, H, N_kv, head_dim), cache dtype
            k, v = kv.keys.to(q.dtype), kv.values.to(q.dtype)
        out = attend(q, k, v, mask, dropout=self.dropout if self.training else 0.0)  # (B, H, N, head_dim)
        out = rearrange(out, "b h n d -> b n (h d)")
        return self.o_proj(out if layout is None else layout.pack(out))


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
