"""The shared pre-norm transformer backbone: RMSNorm, SDPA self-attention with RoPE, SwiGLU.

Each block computes ``x + attn(norm(x))`` then ``x + swiglu(norm(x))``; a final RMSNorm follows
the last block. Masks decide bidirectional, causal or prefix-LM attention (see models/masks.py).

With ``moe={layers: [...], ...}`` the feed-forward of the listed blocks is a modality-aware mixture
of experts (``layers/moe.py``). Such a backbone takes ``modality_ids`` (B, N) (rows of
``MODALITY_INDEX``, -1 for none) in ``forward``, and hands its auxiliary losses and routing
statistics out through an ``aux=MoEAux()`` collector the caller passes (as it passes a KV cache):
the return value and the module's state stay as they are, so every existing caller is unchanged
and nothing is left behind between steps. Without ``moe`` both arguments are accepted and ignored.

References: Vaswani et al. 2017, Attention Is All You Need, arXiv:1706.03762; the pre-norm / RMSNorm
/ SwiGLU / RoPE recipe of Touvron et al. 2023, LLaMA, arXiv:2302.13971.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from polymodal.backbones import BACKBONES
from polymodal.errors import ConfigError
from polymodal.layers.attention import SelfAttention, TokenLayout, attention_bias
from polymodal.layers.drop_path import DropPath, linear_rates
from polymodal.layers.kv_cache import KVCache
from polymodal.layers.mlp import INIT_STD, SwiGLU, swiglu_hidden_dim
from polymodal.layers.moe import MoEAux, ModalityMoE, check_moe_settings
from polymodal.layers.norms import RMSNorm
from polymodal.layers.rope import RotaryAngles, RotaryEmbedding

# Per-token layers skip padding only when at least this share of the (B, N) grid is padding: the
# gathers and scatters around each attention cost about as much as this share of the matmuls saves
# (measured, BENCHMARKS.md "Training throughput").
MIN_SKIPPED = 0.1
# The packed token count is rounded up to a multiple of this, so that its matmuls' shapes repeat
# across batches (``TokenLayout.of``).
PACK_MULTIPLE = 64


@dataclasses.dataclass(frozen=True)
class BackboneIntermediates:
    """Everything ``forward_intermediates`` returns.

    Attributes:
        output: (B, N, D) final-normed hidden states, equal to ``forward``'s result.
        hidden: one (B, N, D) residual stream per block, after that block, before the final norm.
    """

    output: Tensor
    hidden: list[Tensor]


class TransformerBlock(nn.Module):
    """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Args:
        dim: token width D.
        num_heads: attention heads.
        dim_hidden: SwiGLU hidden width.
        dropout: dropout on attention weights, the MLP hidden layer and both residual branches.
        qk_norm: RMSNorm queries and keys per head.
        bias: biases in the linear layers.
        layer_index: this block's slot in a shared KV cache.
        moe: ``ModalityMoE`` settings when the feed-forward is a mixture of experts, else None.
        drop_path: stochastic depth: each residual branch is skipped for an item with this
            probability while training (``layers.drop_path``).
    """

    compile_unit = True  # train.compile compiles each block (training/compile.py)

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        dim_hidden: int,
        dropout: float = 0.0,
        qk_norm: bool = False,
        bias: bool = False,
        layer_index: int = 0,
        moe: Mapping[str, Any] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim)
        self.attn = SelfAttention(
            dim, num_heads=num_heads, qk_norm=qk_norm, bias=bias, dropout=dropout, layer_index=layer_index
        )
        self.mlp_norm = RMSNorm(dim)
        self.mlp: SwiGLU | ModalityMoE = (
            SwiGLU(dim, dim_hidden, bias=bias, dropout=dropout)
            if moe is None
            else ModalityMoE(dim, dim_hidden, bias=bias, dropout=dropout, layer_index=layer_index, **moe)
        )
        self.residual_dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path)

    def init_weights(self, *, std: float, out_std: float) -> None:
        """Norm gains one; projections N(0, std), the two back into the residual stream N(0, out_std)."""
        self.attn_norm.init_weights()
        self.mlp_norm.init_weights()
        self.attn.init_weights(std=std, out_std=out_std)
        self.mlp.init_weights(std=std, out_std=out_std)

    def forward(
        self,
        x: Tensor,
        *,
        rotary: RotaryAngles | None,
        mask: Tensor | None,
        cache: KVCache | None,
        modality_ids: Tensor | None = None,
        aux: MoEAux | None = None,
        layout: TokenLayout | None = None,
    ) -> Tensor:
        """Run the block.

        Args:
            x: (B, N, D) residual stream, or (T, D) with a ``layout``.
            rotary: RoPE angles for the N tokens, shared by every block.
            mask: (B, 1, N, N_kv) bool, True = may attend, or None for full attention.
            cache: shared KV cache this block appends to, or None.
            modality_ids: (B, N) long, or (T,) with a layout, for a mixture-of-experts
                feed-forward; ignored otherwise.
            aux: collector of the mixture of experts' losses and counts; ignored otherwise.
            layout: where the T tokens of ``x`` sit in the (B, N) grid the attention sees.

        Returns:
            (B, N, D), or (T, D) with a layout.
        """
        attended = self.attn(self.attn_norm(x), rotary=rotary, mask=mask, cache=cache, layout=layout)
        x = x + self.drop_path(self.residual_dropout(attended))
        normed = self.mlp_norm(x)
        if isinstance(self.mlp, ModalityMoE):
            return x + self.drop_path(self.residual_dropout(self.mlp(normed, modality_ids=modality_ids, aux=aux)))
        return x + self.drop_path(self.residual_dropout(self.mlp(normed)))


@BACKBONES.register("transformer")
class TransformerBackbone(nn.Module):
    """A stack of pre-norm transformer blocks over already-embedded tokens.

    ``forward`` takes ``needed``, the tokens whose states matter (``skips_padding``): its per-token
    layers then run on those only.

    Args:
        dim: token width D.
        num_layers: number of blocks.
        num_heads: attention heads per block; ``dim / num_heads`` must be even (RoPE pairs).
        mlp_ratio: the SwiGLU matches the parameters of a GELU MLP of hidden width
            ``mlp_ratio * dim``: hidden = 2/3 * mlp_ratio * dim rounded up to a multiple of 8.
        dropout: dropout probability (attention weights, MLP hidden, residual branches).
        rope_base: RoPE wavelength base.
        qk_norm: RMSNorm queries and keys per head.
        bias: biases in the linear layers.
        moe: a mixture of experts in place of some blocks' feed-forward: ``{layers: [1, 3]}`` plus
            any of ``ModalityMoE``'s settings (num_shared_experts, num_private_experts, top_k,
            capacity_factor); None keeps every block dense.
        drop_path: stochastic depth of the last block; block i of L drops with ``drop_path * i /
            (L - 1)`` (Huang et al. 2016's linear rule), the first never.
    """

    skips_padding = True  # forward takes `needed` (see models/sequence.py)

    def __init__(
        self,
        dim: int,
        *,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
        qk_norm: bool = False,
        bias: bool = False,
        moe: dict[str, Any] | None = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.moe_layers, moe_settings = check_moe(moe, num_layers=num_layers, where="moe")
        self.dim = dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dim_hidden = swiglu_hidden_dim(dim, mlp_ratio)
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base)
        drop_rates = linear_rates(drop_path, num_layers)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                dim,
                num_heads=num_heads,
                dim_hidden=self.dim_hidden,
                dropout=dropout,
                qk_norm=qk_norm,
                bias=bias,
                layer_index=i,
                moe=moe_settings if i in self.moe_layers else None,
                drop_path=drop_rates[i],
            )
            for i in range(num_layers)
        )
        self.final_norm = RMSNorm(dim)
        self.init_weights()

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any], where: str) -> None:
        """Check the nested ``moe`` mapping at config load (called by ``Registry.check``)."""
        num_layers = settings.get("num_layers", inspect.signature(cls).parameters["num_layers"].default)
        check_moe(settings.get("moe"), num_layers=num_layers, where=f"{where}.moe")

    def init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, with the projections back into the residual stream
        scaled by 1/sqrt(2 * num_layers) so the residual variance does not grow with depth
        (Radford et al. 2019). Norm gains are one, biases zero. A no-op on the meta device."""
        init_blocks(self.blocks)
        self.final_norm.init_weights()

    def new_cache(
        self, batch_size: int, max_len: int, *, device: torch.device | str | None, dtype: torch.dtype
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        return KVCache(
            self.num_layers, batch_size, self.num_heads, max_len, self.head_dim, device=device, dtype=dtype
        )

    def forward(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        modality_ids: Tensor | None = None,
        aux: MoEAux | None = None,
        needed: Tensor | None = None,
    ) -> Tensor:
        """Run every block.

        Args:
            tokens: (B, N, D) embedded tokens.
            mask: (B, 1, N, N_kv) bool, True = may attend, with N_kv = cached length + N. None
                attends to every key (bidirectional).
            positions: (B, N) long RoPE positions; default ``arange(N)`` offset by the cached length.
            cache: when given, this call's keys/values are appended and its length advanced by N.
            modality_ids: (B, N) long, each token's ``MODALITY_INDEX`` row, -1 for none (specials,
                padding); read by the mixture-of-experts layers only. None = no modality.
            aux: a ``MoEAux`` the mixture-of-experts layers add their losses and counts to.
            needed: (B, N) bool, the tokens whose states the caller reads or others attend; the
                rest (padding) must be attended by no token but themselves. Without a cache, the
                per-token layers then skip the rest (``skip_padding``; with a mixture of experts
                always, so padding is never routed), whose states come back as zeros. None: every
                token is needed.

        Returns:
            (B, N, D) final-normed hidden states.
        """
        layout = None
        if needed is not None and cache is None:
            # A mixture of experts always skips: padding must not take experts' capacity from real
            # tokens, nor count in the balance loss and usage (whatever the share of padding).
            layout = TokenLayout.of(needed) if self.moe_layers else skip_padding(needed)
        if layout is not None and modality_ids is not None:
            modality_ids = layout.pack(modality_ids)  # (B, N) -> (T,), as the tokens
        routing = {"modality_ids": modality_ids, "aux": aux}
        return self._run(tokens, mask=mask, positions=positions, cache=cache, hidden=None, layout=layout, **routing)

    def forward_intermediates(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        modality_ids: Tensor | None = None,
        aux: MoEAux | None = None,
    ) -> BackboneIntermediates:
        """Like ``forward`` (without a cache), also returning each block's residual stream.

        Args:
            tokens: (B, N, D).
            mask: (B, 1, N, N) bool or None.
            positions: (B, N) long or None.
            modality_ids: (B, N) long or None, as in ``forward``.
            aux: a ``MoEAux`` or None, as in ``forward``.

        Returns:
            BackboneIntermediates with ``output`` (B, N, D) and ``hidden``: num_layers x (B, N, D).
        """
        hidden: list[Tensor] = []
        routing = {"modality_ids": modality_ids, "aux": aux}
        output = self._run(tokens, mask=mask, positions=positions, cache=None, hidden=hidden, layout=None, **routing)
        return BackboneIntermediates(output=output, hidden=hidden)

    def _run(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None,
        positions: Tensor | None,
        cache: KVCache | None,
        hidden: list[Tensor] | None,
        layout: TokenLayout | None,
        modality_ids: Tensor | None,
        aux: MoEAux | None,
    ) -> Tensor:
        batch, n, _ = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + n, device=tokens.device).expand(batch, n)  # (B, N)
        rotary = self.rotary(positions, dtype=tokens.dtype)  # computed once, shared by every block
        mask = attention_bias(mask)  # likewise: one additive bias, not a conversion per layer
        x = tokens if layout is None else layout.pack(tokens)  # (B, N, D) or (T, D)
        for block in self.blocks:
            x = block(x, rotary=rotary, mask=mask, cache=cache, modality_ids=modality_ids, aux=aux, layout=layout)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.advance(n)
        x = self.final_norm(x)
        return x if layout is None else layout.unpack(x)


def skip_padding(needed: Tensor) -> TokenLayout | None:
    """The layout that runs per-token layers on the ``needed`` (B, N) tokens only, or None when
    that would skip under ``MIN_SKIPPED`` of the grid (gathering then costs more than it saves)."""
    layout = TokenLayout.of(needed, multiple=PACK_MULTIPLE)
    return layout if layout.fraction <= 1.0 - MIN_SKIPPED else None


def init_blocks(blocks: nn.ModuleList) -> None:
    """GPT-2 initialisation of a stack: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * depth)."""
    out_std = INIT_STD / math.sqrt(2 * len(blocks))
    for block in blocks:
        block.init_weights(std=INIT_STD, out_std=out_std)


def check_moe(moe: Any, *, num_layers: int, where: str) -> tuple[frozenset[int], dict[str, Any]]:
    """Validate a backbone's ``moe`` setting; return (the block indices, the ``ModalityMoE`` settings).

    Raises:
        ConfigError: naming the bad key (``<where>.top_k: ...``) and what is valid.
    """
    if moe is None:
        return frozenset(), {}
    example = "{layers: [1, 3], num_shared_experts: 8, top_k: 2}"
    if not isinstance(moe, Mapping):
        raise ConfigError(f"{where}: expected a mapping such as {example}, or null; got {moe!r}")
    valid = [p.name for p in inspect.signature(check_moe_settings).parameters.values()]
    unknown = sorted(set(moe) - {"layers", *valid})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown setting; valid: layers, {', '.join(valid)}")
    layers = moe.get("layers")
    if (
        not isinstance(layers, (list, tuple))
        or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers for i in layers)
    ):
        raise ConfigError(
            f"{where}.layers: expected a non-empty list of block indices in [0, {num_layers}), got {layers!r}"
        )
    settings = {k: moe[k] for k in valid if k in moe}
    defaults = {k: p.default for k, p in inspect.signature(ModalityMoE).parameters.items() if k in valid}
    try:
        check_moe_settings(**{**defaults, **settings})
    except ValueError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    return frozenset(layers), settings
