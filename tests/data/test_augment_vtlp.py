"""Vocal tract length perturbation: the warp by hand, the warped filterbank against a tone played at
the warped frequency, and the collator's draws replaying from each item's key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.data.audio import LogMel, _hz_to_mel, _mel_to_hz, mel_filterbank
from polymodal.data.augment import AudioAugmentSettings, sample_rng
from polymodal.data.augment_vtlp import WARP_GRID, draw_warp, vtlp_filterbanks, vtlp_warp, warped_filterbank
from polymodal.data.batch import ItemKey, Sample
from polymodal.data.collate import Collator
from polymodal.data.text import TextTokenizer
from polymodal.errors import ConfigError

SAMPLE_RATE, N_FFT, NUM_MELS, BOUNDARY = 16000, 400, 40, 4800.0
NYQUIST = SAMPLE_RATE / 2


@pytest.mark.parametrize("alpha", [0.9, 0.95, 1.05, 1.1])
def test_warp_by_hand(alpha: float) -> None:
    knee = BOUNDARY * min(alpha, 1.0) / alpha
    hz = np.array([0.0, 1000.0, knee, (knee + NYQUIST) / 2, NYQUIST])
    warped = vtlp_warp(hz, alpha, boundary_hz=BOUNDARY, nyquist_hz=NYQUIST)
    # Linear with slope alpha up to the knee, which lands on f_hi * min(alpha, 1); Nyquist stays.
    np.testing.assert_allclose(warped[:3], alpha * hz[:3])
    np.testing.assert_allclose(warped[2], BOUNDARY * min(alpha, 1.0))
    np.testing.assert_allclose(warped[-1], NYQUIST)
    np.testing.assert_allclose(warped[3], (warped[2] + NYQUIST) / 2)  # straight line from the knee to Nyquist
    fine = vtlp_warp(np.linspace(0, NYQUIST, 1001), alpha, boundary_hz=BOUNDARY, nyquist_hz=NYQUIST)
    assert np.all(np.diff(fine) > 0)


def test_a_boundary_above_nyquist_leaves_a_linear_warp_capped_at_nyquist() -> None:
    hz = np.array([0.0, 3000.0, 7900.0])
    np.testing.assert_allclose(vtlp_warp(hz, 1.1, boundary_hz=20000.0, nyquist_hz=NYQUIST), [0.0, 3300.0, NYQUIST])


def test_factor_one_is_the_plain_filterbank() -> None:
    warped = warped_filterbank(1.0, num_mels=NUM_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE, boundary_hz=BOUNDARY)
    torch.testing.assert_close(warped, mel_filterbank(num_mels=NUM_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE), rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.9, 1.1])
@pytest.mark.parametrize("band", [8, 15, 22])
def test_warped_tone_reads_as_the_tone_at_the_warped_frequency(alpha: float, band: int) -> None:
    # Two ways to one spectrum: a tone at f through the filterbank warped by alpha, and a tone at
    # alpha * f through the plain one. alpha * f is put on a band's peak (below the knee), where
    # the triangle is flat enough that the window's leakage reads the same either way.
    centres = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(NYQUIST), NUM_MELS + 2))[1:-1]
    target = float(centres[band])
    t = np.arange(SAMPLE_RATE // 2) / SAMPLE_RATE

    def tone(hz: float) -> torch.Tensor:
        return torch.tensor(np.sin(2 * np.pi * hz * t), dtype=torch.float32)[None]  # (1, T)

    log_mel = LogMel(sample_rate=SAMPLE_RATE, n_fft=N_FFT, num_mels=NUM_MELS)
    filters = vtlp_filterbanks([alpha], num_mels=NUM_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE, boundary_hz=BOUNDARY)
    warped = log_mel(tone(target / alpha), filters)[0].mean(0)  # (num_mels,)
    played = log_mel(tone(target))[0].mean(0)
    assert int(warped.argmax()) == int(played.argmax()) == band
    assert abs(float(warped.max() - played.max())) < 0.2  # natural-log units: 0.9 dB


def test_batched_filters_equal_one_clip_at_a_time() -> None:
    log_mel = LogMel(sample_rate=SAMPLE_RATE, n_fft=N_FFT, num_mels=NUM_MELS)
    waves = torch.randn(3, 4000, generator=torch.Generator().manual_seed(0))
    alphas = [0.9, 1.0, 1.1]
    kw = dict(num_mels=NUM_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE, boundary_hz=BOUNDARY)
    batched = log_mel(waves, vtlp_filterbanks(alphas, **kw))
    for i, alpha in enumerate(alphas):
        torch.testing.assert_close(batched[i], log_mel(waves[i : i + 1], vtlp_filterbanks([alpha], **kw))[0])
    torch.testing.assert_close(batched[1], log_mel(waves[1:2])[0])


def test_draws_are_on_the_grid_in_range_and_replay() -> None:
    draws = [draw_warp(sample_rng(3, 0, i, stream="vtlp"), p=1.0, low=0.9, high=1.1) for i in range(200)]
    assert all(0.9 <= a <= 1.1 and abs(a * WARP_GRID - round(a * WARP_GRID)) < 1e-9 for a in draws)
    assert len(set(draws)) > 20
    assert draws == [draw_warp(sample_rng(3, 0, i, stream="vtlp"), p=1.0, low=0.9, high=1.1) for i in range(200)]
    assert {draw_warp(sample_rng(3, 0, i, stream="vtlp"), p=0.0, low=0.9, high=1.1) for i in range(50)} == {1.0}


def _collator(settings: AudioAugmentSettings) -> Collator:
    tokenizer = TextTokenizer.train(["one", "two"], vocab_size=270)
    return Collator(
        tokenizer, sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=160, num_mels=NUM_MELS,
        max_text_tokens=8, max_audio_seconds=1.0, spec_augment=settings, seed=5,
    )  # fmt: skip


def test_collator_warps_keyed_items_as_their_keys_draw() -> None:
    clips = [0.3 * torch.randn(4000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    collator = _collator(AudioAugmentSettings(vtlp_p=1.0))
    keys = [ItemKey(2, i) for i in range(4)]
    keyed = collator([Sample(audio=c, key=k) for c, k in zip(clips, keys)]).inputs
    plain = collator([Sample(audio=c) for c in clips]).inputs  # evaluation: never warped
    alphas = [draw_warp(sample_rng(5, 2, i, stream="vtlp"), p=1.0, low=0.9, high=1.1) for i in range(4)]
    kw = dict(num_mels=NUM_MELS, n_fft=N_FFT, sample_rate=SAMPLE_RATE, boundary_hz=BOUNDARY)
    expected = collator.log_mel(torch.stack(clips), vtlp_filterbanks(alphas, **kw))
    for modality, features in keyed.items():
        torch.testing.assert_close(features, expected)
        torch.testing.assert_close(plain[modality], collator.log_mel(torch.stack(clips)))
    # An item's warp is its own: the same key in another batch gives the same frames.
    alone = collator([Sample(audio=clips[3], key=keys[3])]).inputs
    for modality, features in alone.items():
        torch.testing.assert_close(features[0], expected[3])


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="vtlp_range"):
        AudioAugmentSettings(vtlp_range=(1.1, 0.9))
    with pytest.raises(ConfigError, match="vtlp_boundary_hz"):
        AudioAugmentSettings(vtlp_boundary_hz=0.0)
    with pytest.raises(ConfigError, match="vtlp_p"):
        AudioAugmentSettings(vtlp_p=1.5)
