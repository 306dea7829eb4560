"""Linear input projector applied per token.

Reference: Liu et al. 2023, Visual Instruction Tuning (LLaVA), arXiv:2304.08485.
"""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.projectors import PROJECTORS


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, *, bias: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        # Per-token: padded tokens stay padded, so the mask needs no work here.
        return self.proj(tokens)  # (B, N, dim_in) -> (B, N, dim_out)
