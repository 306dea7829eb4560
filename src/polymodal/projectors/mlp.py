"""MLP input projector (Linear-GELU-Linear) applied per token.

Reference: Liu et al. 2023, Improved Baselines with Visual Instruction Tuning, arXiv:2310.03744.
"""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.projectors import PROJECTORS


@PROJECTORS.register("mlp")
class MLPProjector(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, *, hidden_mult: float = 1.0) -> None:
        super().__init__()
        dim_hidden = int(dim_out * hidden_mult)
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        # Per-token: padded tokens stay padded, so the mask needs no work here.
        return self.fc2(self.act(self.fc1(tokens)))  # (B, N, dim_in) -> (B, N, dim_out)
