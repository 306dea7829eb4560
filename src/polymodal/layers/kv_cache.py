"""Key/value cache for incremental (autoregressive) decoding.

Preallocated per-layer buffers hold the rotated keys and the values of every token seen so far, so
a decoding step computes attention for its new tokens only instead of re-running the whole prefix.
The usual pattern: one forward over a prefix of length P, then one token per forward.

Reference: Pope et al. 2022, Efficiently Scaling Transformer Inference, arXiv:2211.05102 (the
key/value cache as the standard decoding memory).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class KeyValues:
    """All keys and values one layer attends to after an update.

    Attributes:
        keys: (B, H, N_kv, head_dim), views into the cache buffers.
        values: (B, H, N_kv, head_dim).
    """

    keys: Tensor
    values: Tensor


class KVCache:
    """Per-layer key/value buffers of shape (B, H, max_len, head_dim) and the length filled so far.

    During one backbone forward every layer calls ``update`` with the new tokens' keys and values,
    which are written at ``[length, length + n)``; the backbone then calls ``advance(n)`` once.

    Args:
        num_layers: number of attention layers sharing this cache.
        batch_size: B.
        num_heads: H.
        max_len: the most tokens (prefix + generated) the cache can hold.
        head_dim: width of one head.
        device: where the buffers live.
        dtype: buffer dtype (keys and values are cast to it on write).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, num_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def update(self, layer: int, keys: Tensor, values: Tensor) -> KeyValues:
        """Write a layer's new keys and values after the cached ones and return all of them.

        Args:
            layer: index of the calling attention layer.
            keys: (B, H, n, head_dim) new (already rotated) keys.
            values: (B, H, n, head_dim) new values.

        Returns:
            KeyValues with (B, H, length + n, head_dim) keys and values.
        """
        start, end = self.length, self.length + keys.shape[-2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens do not fit in max_len={self.max_len}")
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return KeyValues(keys=self.keys[layer][:, :, :end], values=self.values[layer][:, :, :end])

    def advance(self, num_tokens: int) -> None:
        """Mark ``num_tokens`` more positions as filled (once per forward, after every layer wrote)."""
        if self.length + num_tokens > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + num_tokens} > max_len={self.max_len}")
        self.length += num_tokens

    def reset(self) -> None:
        """Forget every cached token (the buffers are kept and overwritten later)."""
        self.length = 0

    def select(self, batch_indices: Tensor) -> None:
        """Keep (and reorder) batch rows in place, e.g. after beam search or when sequences finish.

        Args:
            batch_indices: (B',) long indices into the current batch.
        """
        self.keys = [k.index_select(0, batch_indices) for k in self.keys]
        self.values = [v.index_select(0, batch_indices) for v in self.values]
