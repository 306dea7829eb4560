"""The judge-free generation figures on hand-made samples: a generator that returns the real items
scores Fréchet distance 0, one that ignores its noise scores variety 0, and the per-clip mel
statistics equal a loop over frames."""

from __future__ import annotations

import pytest
import torch

from polymodal.evaluation.generation import generation_figures, mel_statistics
from polymodal.evaluation.samples import Generated
from polymodal.modality import Modality


class _NoContrastive:
    model = object()  # no ``contrastive`` attribute: no own-retrieval figure


def test_images_equal_to_the_real_ones_score_zero_distance():
    torch.manual_seed(0)
    real = torch.rand(30, 1, 8, 12) * 2 - 1
    same = torch.rand(3, 1, 1, 8, 12).expand(3, 4, 1, 8, 12)  # every draw of a caption identical
    generated = Generated(captions=[f"c{i}" for i in range(30)], labels=torch.arange(30), images=real.clone(), real=real,
                          real_index=torch.arange(30), repeats=same.clone())  # fmt: skip
    figures = generation_figures(_NoContrastive(), Modality.IMAGE, generated, device="cpu")
    assert abs(figures["frechet_pooled_pixels"]) < 1e-6
    assert figures["variety_l2"] == 0.0 and figures["real_pairwise_l2"] > 0
    shifted = Generated(captions=generated.captions, labels=generated.labels, images=(real + 0.5).clamp(-1, 1), real=real, real_index=torch.arange(30))
    assert generation_figures(_NoContrastive(), Modality.IMAGE, shifted, device="cpu")["frechet_pooled_pixels"] > 0.1


def test_mel_statistics_equal_a_loop():
    torch.manual_seed(1)
    mels = torch.randn(3, 10, 4)
    mask = torch.arange(10)[None, :] < torch.tensor([10, 4, 1])[:, None]
    stats = mel_statistics(mels, mask)
    for b in range(3):
        frames = mels[b, mask[b]].double()
        expected = torch.cat([frames.mean(0), frames.std(0, unbiased=False)])
        torch.testing.assert_close(stats[b], expected)


def test_speech_figures_compare_the_same_captions():
    torch.manual_seed(2)
    real = torch.randn(6, 20, 4) - 2.0  # voiced: above the -12 level
    real_mask = torch.arange(20)[None, :] < torch.tensor([20, 18, 15, 12, 10, 8])[:, None]
    heard = torch.full((8, 20, 4), -23.0)  # two items without real speech first, then the same clips
    heard[2:] = real.masked_fill(~real_mask[:, :, None], -23.0)
    heard_mask = torch.zeros(8, 20, dtype=torch.bool)
    heard_mask[2:] = real_mask
    generated = Generated(captions=[f"c{i}" for i in range(8)], labels=torch.arange(8), heard=heard, heard_mask=heard_mask,
                          real=real.masked_fill(~real_mask[:, :, None], 0.0), real_mask=real_mask, real_index=torch.arange(2, 8))  # fmt: skip
    figures = generation_figures(_NoContrastive(), Modality.AUDIO, generated, device="cpu")
    assert figures["length_ratio"] == pytest.approx(1.0)
    assert abs(figures["frechet_mel_statistics"]) < 1e-6
