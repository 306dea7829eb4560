"""MetaQuery's "Enc-Proj" connector: a few bidirectional transformer blocks at the backbone's width
over the query states, then the ``mlp`` connector to the decoder's width.

MetaQuery found encode-then-project more parameter-efficient than project-then-encode (it runs 24
blocks; a few do at this scale). The blocks are the backbone's own pre-norm blocks (RMSNorm, SDPA
self-attention, SwiGLU) without positions: the queries are already ordered by the backbone's RoPE.

Reference: Pan et al. 2025, Transfer between Modalities with MetaQueries, arXiv:2504.06256
(section 3.2 and its connector ablation).
"""

from __future__ import annotations

from torch import Tensor, nn

from polymodal.backbones.transformer import TransformerBlock, init_blocks
from polymodal.connectors import CONNECTORS
from polymodal.connectors.mlp import MLPConnector
from polymodal.layers.mlp import swiglu_hidden_dim
from polymodal.layers.norms import RMSNorm
from polymodal.models.sequence import source_attention


@CONNECTORS.register("transformer")
class TransformerConnector(nn.Module):
    """Bidirectional blocks at ``dim_in``, a final RMSNorm, then an ``MLPConnector``.

    Args:
        dim_in: the query states' width (the backbone's D).
        dim_out: the condition's width.
        num_layers: transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: the blocks' SwiGLU width as for the backbone (2/3 of ``mlp_ratio * dim_in``).
        hidden_mult: the projecting MLP's hidden width as a multiple of ``dim_out``.
    """

    def __init__(
        self, dim_in: int, dim_out: int, *, num_layers: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0, hidden_mult: float = 2.0
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if dim_in % num_heads:
            raise ValueError(f"dim {dim_in} is not divisible by num_heads {num_heads}")
        hidden = swiglu_hidden_dim(dim_in, mlp_ratio)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim_in, num_heads=num_heads, dim_hidden=hidden, layer_index=i) for i in range(num_layers)
        )
        self.norm = RMSNorm(dim_in)
        self.project = MLPConnector(dim_in, dim_out, hidden_mult=hidden_mult)
        self.init_weights()

    def init_weights(self) -> None:
        init_blocks(self.blocks)
        self.norm.init_weights()
        self.project.init_weights()

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, N, dim_in), (B, N) True on real tokens or None -> (B, N, dim_out): every real token
        sees every real token; a padded one sees them and itself, and no one sees it."""
        attend = None if mask is None else source_attention(mask)  # (B, 1, N, N)
        for block in self.blocks:
            tokens = block(tokens, rotary=None, mask=attend, cache=None)
        return self.project(self.norm(tokens))
