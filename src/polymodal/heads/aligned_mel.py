"""Text -> audio as log-mel frames through a length regulator (FastSpeech-style,
non-autoregressive), learned from the dataset's aligned reference speech.

The source is the text as a speaker says it; the target is its reference recording, aligned token
by token: each source token covers some log-mel frames (``AlignedTargets.durations``). A duration
head learns log(1 + frames); the length regulator makes one target token per ``frames_per_token``
frames, a copy of the source token it falls in plus an embedding of where in that token it lies;
one backbone pass regresses every frame (L1 + L2, ``losses.mel``). Frames are regressed as
(x - center) / scale with the data's own log-mel statistics (``DataShapes``), kept as buffers so a
loaded run needs no data. Training uses the true durations, generation the predicted ones.

References: Ren et al. 2019, FastSpeech, arXiv:1905.09263; the reduction factor of Tacotron, Wang
et al. 2017, arXiv:1703.10135.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from polymodal.data.audio import LOG_FLOOR
from polymodal.data.batch import AlignedTargets
from polymodal.decoders.mel_head import MelFrameHead
from polymodal.heads import HEADS, HeadOutput, HeadWiring
from polymodal.heads.length_regulator import PHASE_BUCKETS, duration_loss, predicted_durations, regulated_tokens
from polymodal.losses.mel import mel_loss
from polymodal.modality import Modality

INIT_STD = 0.02  # GPT-2 (Radford et al. 2019) initialisation scale
SILENCE = math.log(LOG_FLOOR)  # the log-mel of silence: the target past a clip's end


@HEADS.register("aligned_mel")
class AlignedMelHead(nn.Module):
    """Log-mel frames, ``frames_per_token`` per target token.

    Args:
        wiring: mel bands, the longest clip's frames and the log-mel statistics from ``wiring.shapes``.
        frames_per_token: log-mel frames each target token predicts (Tacotron's reduction factor r).
    """

    target = Modality.AUDIO
    reads_references = True
    needs_image_tokenizer = False

    def __init__(self, wiring: HeadWiring, *, frames_per_token: int = 8) -> None:
        super().__init__()
        if frames_per_token < 1:
            raise ValueError(f"frames_per_token must be >= 1, got {frames_per_token}")
        shapes = wiring.shapes
        self.frames_per_token = frames_per_token
        self.num_frames = shapes.num_audio_frames
        self.max_tokens = math.ceil(self.num_frames / frames_per_token)
        self.phase_embed = nn.Embedding(PHASE_BUCKETS, wiring.dim)
        self.duration_head = nn.Linear(wiring.dim, 1)  # log(1 + frames) per source token
        self.mel_head = MelFrameHead(wiring.dim, shapes.num_mels, frames_per_token=frames_per_token)
        self.register_buffer("center", torch.tensor(float(shapes.log_mel_center)))
        self.register_buffer("scale", torch.tensor(float(shapes.log_mel_scale)))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.phase_embed.weight, std=INIT_STD)
        nn.init.normal_(self.duration_head.weight, std=INIT_STD)
        nn.init.zeros_(self.duration_head.bias)
        self.mel_head.init_weights()

    def frame_tokens(self, trunk, source: Tensor, durations: Tensor) -> tuple[Tensor, Tensor]:
        """Frame-group tokens (B, J, D) and their mask (B, J) from the source tokens' ``durations``
        (B, Ns) in log-mel frames: the source token each reads, and where in it."""
        tokens, inside = regulated_tokens(source, durations, self.phase_embed, self.frames_per_token, self.max_tokens)
        return tokens + trunk.type_embedding(Modality.AUDIO, tokens), inside

    def mel_targets(self, log_mels: Tensor, frame_mask: Tensor, num_frames: int) -> Tensor:
        """Collated log-mels (B, F, M) -> normalised targets (B, num_frames, M) (``mel_targets``)."""
        return mel_targets(log_mels, frame_mask, num_frames, self.center, self.scale)

    def loss(self, trunk, source: Tensor, source_mask: Tensor, target: AlignedTargets) -> HeadOutput:
        """Mel frames through the length regulator with the true durations; and the durations."""
        tokens, token_mask = self.frame_tokens(trunk, source, target.durations)
        hidden = trunk.run(source, source_mask, tokens, token_mask)
        predicted = self.mel_head(hidden[:, source.shape[1] :])  # (B, J * r, M), normalised units
        mels = self.mel_targets(target.values, target.value_mask, predicted.shape[1])
        frame_mask = padded_to(target.value_mask, predicted.shape[1])
        duration = duration_loss(self.duration_head, hidden[:, : source.shape[1]], source_mask, target.durations)
        losses = {"": mel_loss(predicted, mels, frame_mask), "duration": duration}
        return HeadOutput(hidden, losses, counts={"": frame_mask.sum(), "duration": source_mask.sum()})

    @torch.no_grad()
    def generate(self, trunk, source: Tensor, source_mask: Tensor) -> Tensor:
        """Log-mel frames (B, F, num_mels), natural log of power as ``LogMel`` makes them, silence
        after each item's predicted end: durations first, then one pass for every frame."""
        durations = predicted_durations(self.duration_head, trunk, source, source_mask)  # (B, Ns) frames
        tokens, token_mask = self.frame_tokens(trunk, source, durations)
        hidden = trunk.run(source, source_mask, tokens, token_mask)
        frames = self.mel_head(hidden[:, source.shape[1] :])[:, : self.num_frames]  # (B, F, M)
        return log_mel_frames(frames, durations.sum(1), self.center, self.scale)


def mel_targets(log_mels: Tensor, frame_mask: Tensor, num_frames: int, center: Tensor, scale: Tensor) -> Tensor:
    """Collated log-mels (B, F, M) -> normalised targets (B, num_frames, M): (x - center) / scale
    over the real frames, then silence to the end (cut if the clip is longer)."""
    batch, _, bands = log_mels.shape
    clip = log_mels.masked_fill(~frame_mask[:, :, None], SILENCE)[:, :num_frames]  # (B, min(F, n), M)
    target = torch.full((batch, num_frames, bands), SILENCE, dtype=log_mels.dtype, device=log_mels.device)
    target[:, : clip.shape[1]] = clip
    return (target - center) / scale


def padded_to(mask: Tensor, length: int) -> Tensor:
    """(B, F) bool -> (B, length): cut, or padded with False."""
    out = torch.zeros(mask.shape[0], length, dtype=torch.bool, device=mask.device)
    out[:, : min(length, mask.shape[1])] = mask[:, :length]
    return out


def log_mel_frames(frames: Tensor, ends: Tensor, center: Tensor, scale: Tensor) -> Tensor:
    """Normalised frames (B, F, M) -> log-mel (natural log of power, as ``LogMel`` makes it), never
    under silence, and silence from each item's end (B,) in frames on."""
    log_mel = (frames.float() * scale + center).clamp(min=SILENCE)
    after_end = torch.arange(log_mel.shape[1], device=log_mel.device)[None, :] >= ends[:, None]
    return log_mel.masked_fill(after_end[:, :, None], SILENCE)
