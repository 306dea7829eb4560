"""Audio encoder: log-mel frames -> strided 1-D convolutions (2x fewer frames each) -> tokens,
optionally followed by a small bidirectional transformer (off by default: the shared backbone then
does the sequence modelling).

``freq_channels`` makes the convolutions 2-D, over mel bands and frames, each followed by a max-pool
of 2 along the bands, and flattens the pooled bands into the token. A talker's vocal tract moves
his formants along the mel axis; weights shared across bands and the pooling let a formant a band
or two away read the same (Abdel-Hamid et al. 2014, Convolutional neural networks for speech
recognition, IEEE/ACM TASLP; the 2-D subsampling of Conformer, Gulati et al. 2020, arXiv:2005.08100).

``res_blocks`` adds, after each of those strided 2-D convolutions, that many residual blocks of two
3 x 3 convolutions at stride 1 with a GELU between (He et al. 2016, arXiv:1512.03385), as
keyword-spotting networks stack them over (band, frame) maps (Tang & Lin 2018, Deep Residual
Learning for Small-Footprint Keyword Spotting, arXiv:1710.10361): more depth over the bands at the
convolutions' own width. One block per conv lifted leave-one-speaker-out on real speech by 2.5
points of the mean over five seeds, for about 1.2x the time (BENCHMARKS.md, "Residual band convolutions").

``input_norm`` normalises each clip first: every mel band's mean over the clip's real frames is
subtracted (cepstral mean normalisation carried to log-mel bands: a fixed channel or microphone
response, and a gain, are a constant added to a band's log power, so this removes them; Atal 1974,
Effectiveness of linear prediction characteristics of the speech wave, JASA), then the clip is
divided by its standard deviation over all its real values. A per-band variance is not taken: a
band a telephone channel emptied has almost no variance, and dividing by it would blow its
rounding noise up to the level of speech.

``lifter`` keeps the first ``lifter`` coefficients of each frame's discrete cosine transform over
the mel bands and transforms back (cepstral liftering: the low quefrencies hold the vocal tract's
spectral envelope, the high ones the ripple of the voice's pitch harmonics, which differs from
talker to talker; Davis & Mermelstein 1980, IEEE TASSP, for the mel cepstrum; Juang, Rabiner &
Wilpon 1987, IEEE TASSP, for liftering). It is one fixed (num_mels x num_mels) matrix, applied
after ``input_norm``, and keeps the bands, so the convolutions read a smoothed log-mel, not MFCCs.

Reference: the convolutional front end of Whisper (Radford et al. 2022, arXiv:2212.04356) and the
conv subsampling of Conformer (Gulati et al. 2020, arXiv:2005.08100). The optional layers are the
library's pre-norm ``TransformerBlock``, without RoPE since sinusoidal positions are already added.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from polymodal.backbones.transformer import TransformerBlock, init_blocks
from polymodal.data.audio import utterance_norm
from polymodal.encoders import ENCODERS
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.layers.mlp import swiglu_hidden_dim
from polymodal.layers.norms import RMSNorm
from polymodal.layers.positional import sinusoidal_embedding
from polymodal.modality import Modality

# Two stride-2 convolutions (the default num_convs).
SUBSAMPLING = 4
FREQ_POOL = 2  # bands max-pooled after each 2-D conv: a formant may move a band per conv
MLP_RATIO = 4.0  # the optional layers' feed-forward width, as in Vaswani et al. 2017
def cepstral_smoother(num_mels: int, keep: int) -> Tensor:
    """(num_mels, num_mels) fp32 matrix S with ``frames @ S`` = inverse DCT of the first ``keep``
    coefficients of each frame's orthonormal DCT-II over the bands (the rest zeroed). S is
    symmetric and a projection: applying it twice is applying it once."""
    band = torch.arange(num_mels, dtype=torch.float64)
    basis = torch.cos(torch.pi * band[:, None] * (band + 0.5) / num_mels) * (2.0 / num_mels) ** 0.5
    basis[0] /= 2**0.5  # (coefficient, band), orthonormal rows
    return (basis[:keep].T @ basis[:keep]).float()


class BandResBlock(nn.Module):
    """``x + conv(gelu(conv(x)))`` over (band, frame) maps, 3 x 3 at stride 1: the shape stays.
    Padded frames are zeroed before each conv, so real frames never read what follows an item."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def reset_parameters(self) -> None:
        self.conv1.reset_parameters()
        self.conv2.reset_parameters()

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """x: (B, C, bands, F); valid: (B, F) True on real frames, or None when all are."""
        inner = F.gelu(self.conv1(x))
        if valid is not None:
            inner = _keep_frames(inner, valid)
        out = x + self.conv2(inner)
        return out if valid is None else _keep_frames(out, valid)


def _band_convs(num_convs: int, channels: int, res_blocks: int = 0) -> nn.Sequential:
    """2-D convs over (band, frame), 3 x 3, stride 2 along frames only, each then a max-pool of
    ``FREQ_POOL`` along bands, a GELU and ``res_blocks`` ``BandResBlock``s. The pool never mixes
    frames, so the mask zeroes padded frames after the GELU as it does for the 1-D convs."""
    layers: list[nn.Module] = []
    channels_in = 1
    for _ in range(num_convs):
        layers += [
            nn.Conv2d(channels_in, channels, 3, stride=(1, 2), padding=1),
            nn.MaxPool2d((FREQ_POOL, 1), ceil_mode=True),
            nn.GELU(),
            *(BandResBlock(channels) for _ in range(res_blocks)),
        ]
        channels_in = channels
    return nn.Sequential(*layers)


def _keep_frames(x: Tensor, valid: Tensor) -> Tensor:
    """Conv activations (B, C, F) or (B, C, bands, F) with the frames where ``valid`` (B, F) is False zeroed."""
    return x * valid.view(valid.shape[0], *[1] * (x.ndim - 2), valid.shape[1]).to(x.dtype)


def _frames_last(x: Tensor) -> Tensor:
    """Conv activations (B, C, F) or (B, C, bands, F) -> per-frame features (B, F, C[ * bands])."""
    if x.ndim == 3:
        return x.transpose(1, 2)
    return rearrange(x, "b c m f -> b f (c m)")


@ENCODERS.register("audio_conv")
class AudioConvEncoder(nn.Module):
    """Log-mel (B, F, num_mels) -> tokens (B, ceil(F / 2^num_convs), dim), with sinusoidal positions.

    Args:
        num_mels: mel bins per frame.
        dim: token width D.
        num_convs: stride-2 convolutions (kernel 3, padding 1), each halving the frames.
        num_layers: transformer blocks after the convolutions; 0 returns the normed conv tokens,
            with the parameters of the conv-only encoder.
        num_heads: attention heads of those blocks.
        input_norm: normalise each clip's log-mel first (see the module docstring).
        dropout: on the output tokens (and inside the optional blocks) while training.
        freq_channels: channels of 2-D convolutions over (band, frame) with a band max-pool of
            ``FREQ_POOL`` after each (see the module docstring); 0 keeps the 1-D convolutions.
        lifter: cepstral coefficients kept per frame (see the module docstring); 0, or num_mels
            and more, keep every one.
        res_blocks: residual 2-D conv blocks after each strided 2-D conv (see the module
            docstring); needs ``freq_channels``.
    """

    modality = Modality.AUDIO

    def __init__(
        self,
        num_mels: int,
        *,
        dim: int = 128,
        num_convs: int = 2,
        num_layers: int = 0,
        num_heads: int = 4,
        input_norm: bool = False,
        dropout: float = 0.0,
        freq_channels: int = 0,
        lifter: int = 0,
        res_blocks: int = 0,
    ) -> None:
        super().__init__()
        if res_blocks < 0 or (res_blocks and not freq_channels):
            raise ValueError(f"res_blocks={res_blocks}: give 0, or a positive count with freq_channels > 0 (2-D convolutions)")
        if lifter < 0:
            raise ValueError(f"lifter must be >= 0 (0: off), got {lifter}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if freq_channels < 0:
            raise ValueError(f"freq_channels must be >= 0 (0: 1-D convolutions), got {freq_channels}")
        self.input_norm = input_norm
        # Not persistent: a fixed function of (num_mels, lifter), so checkpoints keep their keys.
        smooths = 0 < lifter < num_mels  # keeping num_mels or more coefficients keeps every one
        self.register_buffer("smoother", cepstral_smoother(num_mels, lifter) if smooths else None, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.freq_channels = freq_channels
        if freq_channels:
            self.convs = _band_convs(num_convs, freq_channels, res_blocks)
            # ceil: the pool keeps an odd last band, and nested ceils of halving are one ceil
            bands = -(-num_mels // FREQ_POOL**num_convs)
            self.flatten = nn.Linear(freq_channels * bands, dim)
        else:
            layers: list[nn.Module] = []
            dim_in = num_mels
            for _ in range(num_convs):
                layers += [nn.Conv1d(dim_in, dim, 3, stride=2, padding=1), nn.GELU()]
                dim_in = dim
            self.convs = nn.Sequential(*layers)
        self.num_convs = num_convs
        self.norm = nn.LayerNorm(dim)
        self.num_layers = num_layers
        self.dim_out = dim
        if num_layers:  # no modules at all otherwise: conv-only checkpoints keep their keys
            dim_hidden = swiglu_hidden_dim(dim, MLP_RATIO)
            self.blocks = nn.ModuleList(
                TransformerBlock(dim, num_heads=num_heads, dim_hidden=dim_hidden, dropout=dropout)
                for _ in range(num_layers)
            )
            self.final_norm = RMSNorm(dim)
            # Only the blocks need it: the convs and LayerNorm were initialised by their constructors,
            # and not re-drawing them keeps the conv-only encoder's seeded weights as they were.
            self.init_weights()

    def init_weights(self) -> None:
        """Convs and LayerNorm with PyTorch's defaults (as the conv-only encoder always had); the
        optional blocks GPT-2 style, residual outputs scaled by 1/sqrt(2 L)."""
        for layer in self.convs:
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, BandResBlock)):
                layer.reset_parameters()
        if self.freq_channels:
            self.flatten.reset_parameters()
        self.norm.reset_parameters()
        if not self.num_layers:
            return
        init_blocks(self.blocks)
        self.final_norm.init_weights()

    def output_lengths(self, lengths: Tensor) -> Tensor:
        """Frames after subsampling: each stride-2 conv (k=3, p=1) maps L -> ceil(L / 2)."""
        for _ in range(self.num_convs):
            lengths = (lengths + 1) // 2
        return lengths

    def forward_intermediates(self, mels: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Subsample, add positions, normalise, then run the optional blocks.

        Args:
            mels: (B, F, num_mels) log-mel frames.
            mask: (B, F) bool, True on real frames (padding at the end); None when all are real.

        Returns:
            EncoderIntermediates: ``output`` as ``forward`` (tokens (B, F', dim), mask (B, F') or
            None); ``hidden``: one (B, F_i, dim) state per conv, then one (B, F', dim) residual
            stream per block.
        """
        if self.input_norm:
            mels = utterance_norm(mels, mask)
        if self.smoother is not None:
            with torch.autocast(mels.device.type, enabled=False):  # fp32: a sum over every band
                mels = (mels.float() @ self.smoother).to(mels.dtype)
        x = mels.transpose(1, 2)  # (B, num_mels, F)
        if self.freq_channels:
            x = x[:, None]  # (B, 1, num_mels, F): bands as height, frames as width
        lengths = valid = None
        if mask is not None:
            # Zero the padded frames before every conv, so a frame at the edge of an item reads the
            # same zeros as the conv's own padding would give it: real outputs do not depend on
            # how much padding (or what values in it) follows.
            lengths = mask.sum(1)  # (B,)
            x = _keep_frames(x, mask)
        stages = []  # one map per strided conv, after its residual blocks
        for layer in self.convs:
            if isinstance(layer, BandResBlock):
                x = stages[-1] = layer(x, valid)
                continue
            x = layer(x)
            if isinstance(layer, nn.GELU):
                if lengths is not None:
                    lengths = (lengths + 1) // 2  # ceil(L / 2), as in output_lengths
                    valid = torch.arange(x.shape[-1], device=x.device)[None] < lengths[:, None]  # (B, F_i)
                    x = _keep_frames(x, valid)
                stages.append(x)
        hidden = [_frames_last(stage) for stage in stages]
        tokens = self.flatten(_frames_last(x)) if self.freq_channels else x.transpose(1, 2)  # (B, F', dim)
        positions = sinusoidal_embedding(
            torch.arange(tokens.shape[1], device=tokens.device), tokens.shape[-1]
        )
        tokens = self.dropout(self.norm(tokens + positions.to(tokens.dtype)))
        out_mask = None
        if mask is not None:
            out_lengths = self.output_lengths(mask.sum(1))  # (B,)
            out_mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < out_lengths[:, None]  # (B, F')
        if not self.num_layers:
            return EncoderIntermediates(EncoderOutput(tokens, out_mask), hidden)
        attn_mask = None
        if out_mask is not None:
            # Real queries never see padded keys; a padded query may attend itself, so that no
            # softmax row is fully masked (which would give NaN).
            self_only = torch.eye(tokens.shape[1], dtype=torch.bool, device=tokens.device)  # (F', F')
            attn_mask = (out_mask[:, None, :] | self_only)[:, None]  # (B, 1, F', F')
        for block in self.blocks:
            tokens = block(tokens, rotary=None, mask=attn_mask, cache=None)
            hidden.append(tokens)
        return EncoderIntermediates(EncoderOutput(self.final_norm(tokens), out_mask), hidden)

    def forward(self, mels: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Log-mel (B, F, num_mels) and optional mask (B, F) -> EncoderOutput (tokens (B, F', dim))."""
        return self.forward_intermediates(mels, mask).output
