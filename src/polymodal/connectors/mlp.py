"""The "Proj" half of MetaQuery's connector: Linear -> GELU -> Linear -> RMSNorm per token.

The closing RMSNorm fixes the condition's scale whatever the backbone's states look like; MetaQuery
tunes its gain to the decoder's expected input scale, here a learned gain starting at one (the
decoder's cross-attention projections are initialised for unit-scale inputs).

Reference: Pan et al. 2025, Transfer between Modalities with MetaQueries, arXiv:2504.06256
(section 3.2, the connector); the MLP projector of Liu et al. 2023, arXiv:2310.03744.
"""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.connectors import CONNECTORS
from polymodal.layers.mlp import GeluMLP
from polymodal.layers.norms import RMSNorm


@CONNECTORS.register("mlp")
class MLPConnector(nn.Module):
    """Per-token MLP then RMSNorm.

    Args:
        dim_in: the query states' width (the backbone's D).
        dim_out: the condition's width (the decoder's cross-attention context).
        hidden_mult: the MLP's hidden width as a multiple of ``dim_out``.
    """

    def __init__(self, dim_in: int, dim_out: int, *, hidden_mult: float = 2.0) -> None:
        super().__init__()
        if hidden_mult <= 0:
            raise ValueError(f"hidden_mult must be > 0, got {hidden_mult}")
        self.mlp = GeluMLP(dim_in, max(1, int(dim_out * hidden_mult)), dim_out)
        self.norm = RMSNorm(dim_out)
        self.init_weights()

    def init_weights(self) -> None:
        self.mlp.init_weights()
        self.norm.init_weights()

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, dim_in) -> (B, N, dim_out); per token, so the mask (B, N) changes nothing."""
        return self.norm(self.mlp(tokens))
