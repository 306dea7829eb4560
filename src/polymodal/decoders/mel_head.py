"""Mel-frame head: backbone states -> several log-mel frames per token through one linear layer.

Predicting ``frames_per_token`` frames per step is the reduction factor r of Tacotron: Wang et al.
2017, Tacotron: Towards End-to-End Speech Synthesis, arXiv:1703.10135 (section 3.3). Neighbouring
frames are strongly correlated, so one state can carry r of them and the sequence shrinks r-fold.
Train with ``polymodal.losses.mel.mel_loss``; turn the frames into audio with
``polymodal.decoders.vocoder.GriffinLimVocoder``.
"""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale


class MelFrameHead(nn.Module):
    """Linear map from each state to ``frames_per_token`` consecutive mel frames.

    Args:
        dim: width of the backbone states.
        num_mels: mel bands per frame.
        frames_per_token: Tacotron's reduction factor r.
    """

    def __init__(self, dim: int, num_mels: int, *, frames_per_token: int = 4) -> None:
        super().__init__()
        if frames_per_token < 1:
            raise ValueError(f"frames_per_token must be >= 1, got {frames_per_token}")
        self.num_mels = num_mels
        self.frames_per_token = frames_per_token
        self.proj = nn.Linear(dim, frames_per_token * num_mels)
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) weights, zero bias. A no-op on meta."""
        nn.init.normal_(self.proj.weight, std=INIT_STD)
        nn.init.zeros_(self.proj.bias)

    def frame_mask(self, token_mask: Tensor) -> Tensor:
        """Which predicted frames come from real tokens.

        Args:
            token_mask: (B, N) bool, True at real tokens.

        Returns:
            (B, N * frames_per_token) bool.
        """
        return token_mask.repeat_interleave(self.frames_per_token, dim=1)  # (B, N) -> (B, N*r)

    def forward(self, states: Tensor) -> Tensor:
        """Mel frames predicted from backbone states.

        Args:
            states: (B, N, dim).

        Returns:
            (B, N * frames_per_token, num_mels); token n gives frames n*r .. n*r + r - 1.
        """
        frames = self.proj(states)  # (B, N, r * num_mels)
        return rearrange(frames, "b n (r m) -> b (n r) m", r=self.frames_per_token)
