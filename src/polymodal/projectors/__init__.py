"""Input projectors: encoder tokens (B, N, dim_in) -> backbone tokens (B, N', dim_out).

Built with wiring ``(dim_in, dim_out)``; settings keyword-only.
"""

from polymodal.registry import Registry

PROJECTORS: Registry = Registry("projector")

from polymodal.projectors import linear, mlp  # noqa: E402,F401  (register parts)

__all__ = ["PROJECTORS"]
