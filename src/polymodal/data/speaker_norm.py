"""Speaker-level normalisation of log-mel frames (``data.speaker_norm``).

The audio encoders' ``input_norm`` normalises each clip by its own statistics: every mel band's
mean over the clip is subtracted. On a clip of one short word, that mean is partly the word ("six"
is mostly hiss, "eight" a burst), so the normalisation removes some of what the model has to hear.
Speaker-level cepstral mean and variance normalisation takes the statistics over all of a
speaker's clips instead (Kaldi's per-speaker CMVN; Viikki & Laurila 1998, Cepstral domain segmental
feature vector normalization for noise robust speech recognition, Speech Communication 25): what
stays the same from clip to clip (the microphone and room, the talker's vocal tract, his level) is
removed, and the words, which change, are kept. With it the ``speech`` preset reads a Free Spoken
Digit Dataset speaker it never heard at 85.0-88.7% on average over the four folds (three seeds,
1,500 steps), against 78.8-82.1% with each clip normalised alone (BENCHMARKS.md, "Speaker-level
normalisation in the library"); at the 2,000 steps it now trains, 87.6-88.0%.

A clip's speaker is its manifest line's ``speaker`` field. A speaker's statistics are taken over
every clip of his that the run reads, unaugmented and without its transcript: his training clips,
and for a speaker heard only in a test manifest, his test clips (an unsupervised adaptation to a
new speaker, as a recogniser adapts to a new user's voice and microphone before it transcribes).
A clip without a speaker (a single clip given to ``generate``) is normalised on its own
(``utterance_norm``); synthetic speech comes with speakers of its own (``synthetic_speech.py``).
The encoder's own ``input_norm`` must then be off, or it would normalise each clip again.

Written here: the statistics are two running sums per speaker over the frames the collator makes;
no library computes them over a dataset of clips grouped by a manifest field.
"""

from __future__ import annotations

import torch
from torch import Tensor

from polymodal.data.audio import NORM_EPS, utterance_norm

SPEAKER_KEY = "speaker"  # the manifest field naming a clip's speaker


class SpeakerStatistics:
    """Running per-speaker sums of log-mel frames and their squares (fp64: many clips' frames)."""

    def __init__(self) -> None:
        self._sums: dict[str, tuple[int, Tensor, Tensor]] = {}  # speaker -> (frames, sum (M,), sum of squares (M,))

    def add(self, speaker: str, frames: Tensor) -> None:
        """One clip's real log-mel frames (F, num_mels) for ``speaker``."""
        x = frames.double()
        zeros = torch.zeros(x.shape[-1], dtype=torch.float64)
        count, total, squares = self._sums.get(speaker, (0, zeros, zeros))
        self._sums[speaker] = (count + x.shape[0], total + x.sum(0), squares + x.square().sum(0))

    def table(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per speaker with any frames: (his mean (num_mels,), 1 / his std) in fp32. The std is taken
        over all his values around their band's mean, as ``utterance_norm`` takes a clip's."""
        out = {}
        for speaker, (count, total, squares) in self._sums.items():
            if count == 0:
                continue
            mean = total / count  # (M,)
            var = (squares / count - mean.square()).clamp(min=0.0).mean()
            out[speaker] = (mean.float(), torch.rsqrt(var + NORM_EPS).float())
        return out


def speaker_normalised(features: Tensor, mask: Tensor, speakers: list[str | None], table: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """(B, F, M) log-mel frames, each item by its speaker's statistics in ``table``, or by its own
    (``utterance_norm``) when it has no speaker there. Padded frames come back 0. fp32."""
    x = features.float()
    out = torch.empty_like(x)
    alone = [i for i, speaker in enumerate(speakers) if speaker not in table]
    if alone:
        out[alone] = utterance_norm(x[alone], mask[alone])
    for i, speaker in enumerate(speakers):
        if speaker in table:
            mean, inv_std = table[speaker]
            out[i] = (x[i] - mean) * inv_std * mask[i, :, None]
    return out
