"""Input projectors: encoder tokens (B, N, dim_in) -> backbone tokens (B, N', dim_out).

Built with wiring ``(dim_in, dim_out)``; settings keyword-only. Every projector has
``forward(tokens, mask=None)`` with ``mask`` (B, N) True on real tokens; per-token projectors keep N,
query-based ones (cross_attention, qformer) return a fixed number of tokens.
"""

from polymodal.registry import Registry

PROJECTORS: Registry = Registry("projector")

from polymodal.projectors import cross_attention, linear, mlp, qformer  # noqa: E402,F401  (register parts)

__all__ = ["PROJECTORS"]
