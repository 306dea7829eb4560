"""Probe classifiers that read the number shown in an image or spoken in a clip: the judges of
generated images (text -> image) and generated speech (text -> audio) on the built-in data.

``ImageProbe`` is a small CRNN (Shi et al. 2015, arXiv:1507.05717) on normalised (B, 1, 32, 96)
images: strided convolutions, then a bidirectional GRU over the columns. ``AudioProbe`` normalises
each clip's log-mel bands over its real frames (cepstral mean and variance normalisation),
subsamples time 4x with two strided 1-D convolutions and reads the frames with a bidirectional GRU
(Cho et al. 2014, arXiv:1406.1078); every stage is masked, so a clip scores the same whatever the
padding of its batch.

Which real data each probe learns from (the choice ``benchmarks/train_probes.py`` makes). The
issue asks for an image judge trained on real test-split images. In the built-in data the test
split's handwriting comes from its own pool of only 10% of the 5,000 MNIST digits (about 50 per
class), and a 20,000-sample build has 2,000 test items: a seeded 80/20 split of them gives a probe
1,600 training items, and its held-out fifth shares handwriting with them, so that figure would not
tell how the probe reads new handwriting (generated images are new handwriting). The recommended
set-up is therefore: train on train + val (18,000 items), report the accuracy on the whole test
split, whose handwriting and voices (drawn per utterance) the probe never saw; the judge stays
independent of whatever a generator learns from, as long as the generator's own figures are taken
on test prompts. Measured (seed 0, 1,200 image / 600 audio steps, one thread): image 91.8% on the
2,000 test items (the issue's 80/20 set-up: 82.0% on its 400, too few items to learn from), speech
97.7%. ``fit_image_probe`` and ``fit_audio_probe`` take any (train, eval) pair, so either set-up
is one call away (``split_dataset`` for the 80/20 one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from polymodal.data.batch import Batch
from polymodal.datasets.spoken_numbers.digit_slots import DigitSlotHead, DigitSlotLogits
from polymodal.modality import Modality

IMAGE_SHRINK = 8  # three stride-2 convolutions in ImageProbe
CMVN_EPS = 1e-5  # floor of a band's variance over a clip (a silent band would divide by 0)


class ImageProbe(nn.Module):
    """Normalised images (B, 1, H, W) -> ``DigitSlotLogits``.

    Four conv-BN-ReLU layers, three of stride 2 (digits are 19..29 pixels tall, still legible at
    half resolution: 32 x 96 -> 4 x 12); the columns of the last map are read left
    to right by a bidirectional GRU (a CRNN: Shi et al. 2015, arXiv:1507.05717), whose two final
    states feed the heads. The GRU counts the digits and knows which comes first wherever the row
    of digits starts.

    Args:
        image_height: H, a multiple of 8; any width works.
        channels: widths of the stride-2 stem, the two middle layers and the last layer.
        dim_hidden: GRU width per direction.
        dropout: before the heads.
        jitter: training-time random scale (1 +- jitter) and shift (up to jitter x H pixels); off by
            default, since in one measurement (1,200 steps on 18,000 images) 0.1 lowered the held-out
            accuracy from 92.8% to 91.4%.
        max_digits: S, the digit slots.
    """

    modality = Modality.IMAGE

    def __init__(
        self,
        *,
        image_height: int = 32,
        channels: tuple[int, int, int] = (16, 32, 64),
        dim_hidden: int = 64,
        dropout: float = 0.2,
        jitter: float = 0.0,
        max_digits: int = 3,
    ) -> None:
        super().__init__()
        self.jitter = jitter

        def conv(dim_in: int, dim_out: int, stride: int) -> list[nn.Module]:
            conv2d = nn.Conv2d(dim_in, dim_out, 3, stride=stride, padding=1, bias=False)
            return [conv2d, nn.BatchNorm2d(dim_out), nn.ReLU()]

        # Strided convolutions rather than conv + max pooling: on a CPU the full-resolution maps
        # dominate the cost, and a stride-2 conv never builds them.
        dim_stem, dim_mid, dim_out = channels
        self.convs = nn.Sequential(
            *conv(1, dim_stem, 2),  # (B, C1, H / 2, W / 2)
            *conv(dim_stem, dim_mid, 2),  # (B, C2, H / 4, W / 4)
            *conv(dim_mid, dim_mid, 1),
            *conv(dim_mid, dim_out, 2),  # (B, C3, H / 8, W / 8)
        )
        self.shrink = IMAGE_SHRINK
        if image_height % self.shrink:
            raise ValueError(f"image_height must divide by {self.shrink}, got {image_height}")
        dim_column = dim_out * (image_height // self.shrink)  # features of one column of the last map
        self.gru = nn.GRU(dim_column, dim_hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = DigitSlotHead(2 * dim_hidden, max_digits=max_digits)

    def _jittered(self, images: Tensor) -> Tensor:
        """Training-time augmentation: each image scaled by 1 +- jitter and shifted by up to
        jitter x its height, so the probe does not fit the exact layouts of its training images."""
        batch = images.shape[0]
        draws = torch.rand(batch, 3, device=images.device) * 2 - 1  # (B, 3) in [-1, 1)
        scale = 1 + self.jitter * draws[:, 0]  # (B,)
        height, width = images.shape[-2:]
        theta = torch.zeros(batch, 2, 3, device=images.device, dtype=images.dtype)  # output -> input coordinates
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, 0, 2] = 2 * self.jitter * draws[:, 1] * height / width  # shifts in [-1, 1] grid units
        theta[:, 1, 2] = 2 * self.jitter * draws[:, 2]
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        # Sampled in [0, 1], where zero padding is the black background, then back to [-1, 1].
        return F.grid_sample((images + 1) / 2, grid, align_corners=False) * 2 - 1

    def features(self, images: Tensor) -> Tensor:
        """(B, 1, H, W) -> (B, 2 * dim_hidden): the GRU's two final states, what the heads read
        (the judge's feature space for Fréchet distances)."""
        if self.training and self.jitter > 0:
            images = self._jittered(images)
        features = self.convs(images)  # (B, 1, H, W) -> (B, C', H', W')
        columns = rearrange(features, "b c h w -> b w (c h)")  # (B, W', C' * H'), left to right
        _, last = self.gru(columns)  # (2, B, dim_hidden): forward state after the right edge, backward after the left
        return torch.cat([last[0], last[1]], dim=-1)

    def forward(self, images: Tensor) -> DigitSlotLogits:
        return self.head(self.dropout(self.features(images)))  # (B, 2 * dim_hidden) -> heads


class AudioProbe(nn.Module):
    """Log-mel frames (B, F, num_mels) with frame mask (B, F) -> ``DigitSlotLogits``.

    Args:
        num_mels: the collator's mel bands.
        dim: conv width.
        num_convs: stride-2 convolutions (2^num_convs fewer frames).
        dim_hidden: GRU width per direction.
        dropout: before the heads.
        max_digits: S, the digit slots.
    """

    modality = Modality.AUDIO

    def __init__(
        self,
        *,
        num_mels: int = 64,
        dim: int = 128,
        num_convs: int = 2,
        dim_hidden: int = 96,
        dropout: float = 0.2,
        max_digits: int = 3,
    ) -> None:
        super().__init__()
        # Stride-2 convolutions: 2^num_convs fewer frames for the GRU. At 10 ms per frame and 4x,
        # a GRU step covers 40 ms; a spoken digit word lasts about 200 ms or more.
        self.convs = nn.ModuleList(
            nn.Conv1d(num_mels if i == 0 else dim, dim, 5, stride=2, padding=2) for i in range(num_convs)
        )
        self.gru = nn.GRU(dim, dim_hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.head = DigitSlotHead(2 * dim_hidden, max_digits=max_digits)

    @staticmethod
    def _normalise(mels: Tensor, mask: Tensor) -> Tensor:
        """Per clip and band: zero mean, unit variance over the real frames; padding stays 0."""
        weights = mask[:, :, None].to(mels.dtype)  # (B, F, 1)
        count = weights.sum(1, keepdim=True).clamp(min=1)  # (B, 1, 1)
        mean = (mels * weights).sum(1, keepdim=True) / count  # (B, 1, num_mels)
        var = ((mels - mean) ** 2 * weights).sum(1, keepdim=True) / count
        return (mels - mean) * torch.rsqrt(var + CMVN_EPS) * weights

    def forward(self, mels: Tensor, mask: Tensor) -> DigitSlotLogits:
        lengths = mask.sum(1)  # (B,)
        x = self._normalise(mels, mask).transpose(1, 2)  # (B, num_mels, F)
        for conv in self.convs:
            x = F.gelu(conv(x))  # (B, dim, F') -> (B, dim, ceil(F' / 2))
            # A stride-2 conv (k=5, p=2) maps L real frames to ceil(L / 2); zero the frames past
            # them, so the next layer reads zeros there whatever the batch's padding.
            lengths = (lengths + 1) // 2
            keep = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]  # (B, F')
            x = x * keep[:, None, :].to(x.dtype)
        packed = pack_padded_sequence(
            x.transpose(1, 2), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )  # (B, F', dim) without the padding
        _, last = self.gru(packed)  # (2, B, dim_hidden): forward state at each clip's end, backward at its start
        features = torch.cat([last[0], last[1]], dim=-1)  # (B, 2 * dim_hidden)
        return self.head(self.dropout(features))


def probe_inputs(probe: nn.Module, batch: Batch) -> tuple[tuple[Tensor, ...], Tensor]:
    """The probe's inputs from a batch, keeping only the items that carry its modality; and their labels."""
    modality = probe.modality
    if modality not in batch.inputs:
        return (), batch.labels[:0]
    keep = batch.present[modality]  # (B,)
    if modality == Modality.AUDIO:
        return (batch.inputs[modality][keep], batch.masks[modality][keep]), batch.labels[keep]
    return (batch.inputs[modality][keep],), batch.labels[keep]
