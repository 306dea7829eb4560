"""Connectors: the states of learnable queries (B, N, dim_in) -> a generator's condition
(B, N, dim_out), as MetaQuery's "Enc-Proj" connector (Pan et al. 2025, arXiv:2504.06256).

Built with wiring ``(dim_in, dim_out)``; settings keyword-only. Every connector has
``forward(tokens, mask=None) -> (B, N, dim_out)`` and ``init_weights()``. The query tokens have no
padding; the mask (B, N), True on real tokens, comes with a condition that also carries the padded
source's states (``heads/queries.py`` ``read_source``): a real token's output never depends on a
padded one.
"""

from polymodal.registry import Registry

CONNECTORS: Registry = Registry("connector")

from polymodal.connectors import mlp, transformer  # noqa: E402,F401  (register parts)

__all__ = ["CONNECTORS"]
