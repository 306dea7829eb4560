"""Audio encoder: log-mel frames -> two strided 1-D convolutions (4x fewer frames) -> tokens.

Reference: the convolutional front end of Whisper (Radford et al. 2022, arXiv:2212.04356) and the
conv subsampling of Conformer (Gulati et al. 2020, arXiv:2005.08100), without the transformer
stack: the shared backbone does the sequence modelling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.layers.positional import sinusoidal_embedding
from polymodal.modality import Modality

# Two stride-2 convolutions.
SUBSAMPLING = 4


@ENCODERS.register("audio_conv")
class AudioConvEncoder(nn.Module):
    """Log-mel (B, F, num_mels) -> tokens (B, ceil(F/4), dim), with sinusoidal positions."""

    modality = Modality.AUDIO

    def __init__(self, num_mels: int, *, dim: int = 128, num_convs: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dim_in = num_mels
        for _ in range(num_convs):
            layers += [nn.Conv1d(dim_in, dim, 3, stride=2, padding=1), nn.GELU()]
            dim_in = dim
        self.convs = nn.Sequential(*layers)
        self.num_convs = num_convs
        self.norm = nn.LayerNorm(dim)
        self.dim_out = dim

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames after subsampling: each stride-2 conv (k=3, p=1) maps L -> ceil(L / 2)."""
        for _ in range(self.num_convs):
            lengths = (lengths + 1) // 2
        return lengths

    def forward_intermediates(self, mels: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        x = mels.transpose(1, 2)  # (B, num_mels, F)
        hidden = []
        for layer in self.convs:
            x = layer(x)
            if isinstance(layer, nn.GELU):
                hidden.append(x.transpose(1, 2))
        tokens = x.transpose(1, 2)  # (B, F', dim)
        positions = sinusoidal_embedding(
            torch.arange(tokens.shape[1], device=tokens.device), tokens.shape[-1]
        )
        tokens = self.norm(tokens + positions.to(tokens.dtype))
        out_mask = None
        if mask is not None:
            lengths = self.output_lengths(mask.sum(1))
            out_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        return EncoderIntermediates(EncoderOutput(tokens, out_mask), hidden)

    def forward(self, mels: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        return self.forward_intermediates(mels, mask).output
