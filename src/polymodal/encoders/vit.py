"""Vision Transformer image encoder: non-overlapping patches -> linear embedding (a strided conv),
a CLS token first, learned or fixed 2-D sin-cos positions, then a stack of transformer blocks.

References: Dosovitskiy et al. 2020, An Image is Worth 16x16 Words, arXiv:2010.11929 (patches, CLS
token, learned positions; seed 004's 224x224x3 -> 196 patches of 16x16x3 plus CLS); the 2-D sin-cos
positions of He et al. 2021, Masked Autoencoders Are Scalable Vision Learners, arXiv:2111.06377.
The blocks are the library's pre-norm ``TransformerBlock`` (RMSNorm, SwiGLU), run without RoPE:
positions are added to the tokens, as in the ViT paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.backbones.transformer import TransformerBlock, init_blocks
from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.layers.mlp import INIT_STD, swiglu_hidden_dim
from polymodal.layers.norms import RMSNorm
from polymodal.layers.positional import sincos_2d_embedding
from polymodal.modality import Modality

POSITIONS = ("learned", "sinusoidal")


@ENCODERS.register("vit")
class ViTEncoder(nn.Module):
    """Images (B, C, H, W) -> tokens (B, [1 +] H/p * W/p, dim), the CLS token first when on.

    Args:
        in_channels: C.
        image_size: (H, W); both divisible by ``patch_size``.
        dim: token width D.
        patch_size: p, the side of a square patch.
        num_layers: transformer blocks (at least one).
        num_heads: attention heads; ``dim`` must be divisible by it.
        mlp_ratio: the SwiGLU matches a GELU MLP of hidden width ``mlp_ratio * dim``.
        positions: ``"learned"`` (one trained vector per token, CLS included) or ``"sinusoidal"``
            (fixed 2-D sin-cos over the patch grid; the CLS token gets none, as in MAE).
        cls_token: prepend a learned CLS token (the ViT paper's classification read-out).
    """

    modality = Modality.IMAGE

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        *,
        dim: int = 128,
        patch_size: int = 8,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        positions: str = "learned",
        cls_token: bool = True,
    ) -> None:
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch_size={patch_size}")
        if positions not in POSITIONS:
            raise ValueError(f"unknown positions {positions!r}; valid: {', '.join(POSITIONS)}")
        if positions == "sinusoidal" and dim % 4:
            raise ValueError(f"sinusoidal 2-D positions need a dim divisible by 4, got {dim}")
        if num_layers < 1:
            raise ValueError(f"a ViT needs at least one layer, got num_layers={num_layers}")
        self.image_size = (height, width)
        self.grid = (height // patch_size, width // patch_size)
        self.num_prefix = 1 if cls_token else 0
        self.num_tokens = self.num_prefix + self.grid[0] * self.grid[1]
        self.positions = positions
        self.num_layers = num_layers
        self.dim_out = dim

        # A conv with kernel = stride = p is the paper's "linear projection of flattened patches".
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim)) if cls_token else None
        self.pos = nn.Parameter(torch.empty(1, self.num_tokens, dim)) if positions == "learned" else None
        dim_hidden = swiglu_hidden_dim(dim, mlp_ratio)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads=num_heads, dim_hidden=dim_hidden) for _ in range(num_layers)
        )
        self.final_norm = RMSNorm(dim)
        self.init_weights()

    def init_weights(self) -> None:
        """Patch projection Xavier-uniform as a flat linear layer (MAE), zero bias; CLS and learned
        positions N(0, 0.02); blocks GPT-2 style with residual outputs scaled by 1/sqrt(2 L)."""
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=INIT_STD)
        if self.pos is not None:
            nn.init.trunc_normal_(self.pos, std=INIT_STD, a=-3 * INIT_STD, b=3 * INIT_STD)
        init_blocks(self.blocks)
        self.final_norm.init_weights()

    def embed(self, images: Tensor) -> Tensor:
        """Tokens entering the first block: patch embeddings, CLS first, plus positions.

        Args:
            images: (B, C, H, W) with (H, W) the constructor's ``image_size``.

        Returns:
            (B, num_tokens, dim), num_tokens = [1 +] H/p * W/p.
        """
        if tuple(images.shape[-2:]) != self.image_size:
            # The learned positions (and the token count downstream parts expect) fix the grid.
            raise ValueError(f"images of size {tuple(images.shape[-2:])}; the encoder was built for {self.image_size}")
        patches = rearrange(self.patch_embed(images), "b d h w -> b (h w) d")  # (B, h*w, dim), row-major
        if self.cls_token is not None:
            cls = self.cls_token.expand(patches.shape[0], -1, -1)  # (B, 1, dim)
            patches = torch.cat([cls, patches], dim=1)  # (B, 1 + h*w, dim)
        if self.pos is not None:
            return patches + self.pos
        grid_pos = sincos_2d_embedding(*self.grid, patches.shape[-1], device=patches.device)  # (h*w, dim)
        grid_pos = F.pad(grid_pos, (0, 0, self.num_prefix, 0))  # (num_tokens, dim): CLS gets 0
        return patches + grid_pos.to(patches.dtype)

    def forward_intermediates(self, images: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Run the encoder, keeping every block's output.

        Args:
            images: (B, C, H, W).
            mask: accepted like every encoder's and unused (images have no padding).

        Returns:
            EncoderIntermediates: ``output.tokens`` (B, num_tokens, dim) final-normed, as ``forward``;
            ``hidden``: num_layers x (B, num_tokens, dim) residual streams after each block.
        """
        x = self.embed(images)
        hidden = []
        for block in self.blocks:
            x = block(x, rotary=None, mask=None, cache=None)
            hidden.append(x)
        return EncoderIntermediates(EncoderOutput(self.final_norm(x)), hidden)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Images (B, C, H, W) -> EncoderOutput with tokens (B, num_tokens, dim), CLS first; ``mask``
        is unused."""
        return self.forward_intermediates(images).output
