"""FilterAugment: the gain curve's shape, adding it to log-mel frames against filtering the waveform
by the same response, and the collator's draws replaying from each item's key."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import fftconvolve, firwin2

from polymodal.data.audio import LogMel, _hz_to_mel, _mel_to_hz
from polymodal.data.augment import AudioAugmentSettings, sample_rng
from polymodal.data.augment_filter import DB_TO_LOG_POWER, filter_augment, filter_gain
from polymodal.data.batch import ItemKey, Sample
from polymodal.data.collate import Collator
from polymodal.data.text import TextTokenizer
from polymodal.errors import ConfigError

SAMPLE_RATE, N_FFT, NUM_MELS = 8000, 256, 40


@pytest.mark.parametrize("bands", [(1, 1), (2, 5), (6, 6)])
def test_the_curve_is_piecewise_linear_with_as_many_bands_as_drawn(bands: tuple[int, int]) -> None:
    for i in range(50):
        curve = filter_gain(NUM_MELS, np.random.default_rng(i), bands=bands, db=(-6.0, 6.0))
        assert curve.shape == (NUM_MELS,) and np.all(np.abs(curve) <= 6.0)
        bends = np.flatnonzero(np.abs(np.diff(curve, 2)) > 1e-9) + 1  # interior knots where the slope changes
        assert len(bends) <= bands[1] - 1
        if bands == (1, 1):
            np.testing.assert_allclose(curve, np.linspace(curve[0], curve[-1], NUM_MELS))  # one band: a tilt
    curves = [filter_gain(NUM_MELS, np.random.default_rng(i), bands=(2, 5), db=(-6.0, 6.0)) for i in range(3)]
    assert not np.allclose(curves[0], curves[1])
    np.testing.assert_array_equal(curves[2], filter_gain(NUM_MELS, np.random.default_rng(2), bands=(2, 5), db=(-6.0, 6.0)))


def test_adding_the_curve_to_log_mel_equals_filtering_the_waveform() -> None:
    # Two ways to a coloured recording: white noise filtered by an FIR whose magnitude response is
    # the curve (read at each mel band's centre), and the plain log-mel frames plus the curve.
    curve = filter_gain(NUM_MELS, _after_first(np.random.default_rng(7)), bands=(3, 3), db=(-6.0, 6.0))  # (M,) dB
    centres = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), NUM_MELS + 2))[1:-1]
    freqs = np.concatenate([[0.0], centres, [SAMPLE_RATE / 2]])
    gains_db = np.concatenate([[curve[0]], curve, [curve[-1]]])
    fir = firwin2(1023, freqs, 10.0 ** (gains_db / 20.0), fs=SAMPLE_RATE)
    noise = np.random.default_rng(0).standard_normal(4 * SAMPLE_RATE)
    coloured = fftconvolve(noise, fir, mode="same")
    log_mel = LogMel(sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=64, num_mels=NUM_MELS)
    plain = log_mel(torch.tensor(noise[None], dtype=torch.float32))  # (1, F, M)
    filtered = log_mel(torch.tensor(coloured[None], dtype=torch.float32))
    mask = torch.ones(plain.shape[:2], dtype=torch.bool)
    added = filter_augment(plain, mask, [np.random.default_rng(7)], p=1.0, bands=(3, 3), db=(-6.0, 6.0))
    inner = slice(2, NUM_MELS - 2)  # the edge bands see the FIR's transition to DC and Nyquist
    difference = (filtered[0].mean(0) - added[0].mean(0))[inner] / DB_TO_LOG_POWER  # dB, averaged over 4 s of frames
    assert float(difference.abs().max()) < 0.6


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.randn(3, 50, NUM_MELS, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 50, dtype=torch.bool)
    for b, n in enumerate((50, 31, 4)):
        mask[b, :n] = True
    return features, mask


def test_one_curve_per_item_on_its_real_frames_only() -> None:
    features, mask = _batch()
    rngs = [sample_rng(0, 0, i, stream="filter_augment") for i in range(3)]
    out = filter_augment(features, mask, rngs, p=1.0, bands=(2, 5), db=(-10.0, 10.0))
    assert torch.equal(out[~mask], features[~mask]) and torch.equal(features, _batch()[0])
    for b in range(3):
        change = out[b, mask[b]] - features[b, mask[b]]  # (n, M)
        torch.testing.assert_close(change, change[:1].expand_as(change))  # the same colour on every frame
        expected = filter_gain(NUM_MELS, _after_first(sample_rng(0, 0, b, stream="filter_augment")), bands=(2, 5), db=(-10.0, 10.0))
        torch.testing.assert_close(change[0], torch.tensor(expected * DB_TO_LOG_POWER, dtype=torch.float32))
    alone = filter_augment(features[1:2], mask[1:2], [sample_rng(0, 0, 1, stream="filter_augment")], p=1.0, bands=(2, 5), db=(-10.0, 10.0))
    assert torch.equal(alone[0], out[1])  # an item's colour does not depend on its batch
    never = filter_augment(features, mask, [sample_rng(0, 0, i, stream="filter_augment") for i in range(3)], p=0.0, bands=(2, 5), db=(-10.0, 10.0))
    assert torch.equal(never, features)
    with pytest.raises(ValueError, match="one generator per item"):
        filter_augment(features, mask, rngs[:1], p=1.0, bands=(2, 5), db=(-6.0, 6.0))


def _after_first(rng: np.random.Generator) -> np.random.Generator:
    rng.random()  # the draw that decides whether the item is filtered
    return rng


def test_collator_colours_keyed_items_as_their_keys_draw() -> None:
    settings = AudioAugmentSettings(filter_augment_p=1.0, filter_augment_db=(-9.0, 9.0))
    tokenizer = TextTokenizer.train(["one", "two"], vocab_size=270)
    collator = Collator(
        tokenizer, sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=64, num_mels=NUM_MELS,
        max_text_tokens=8, max_audio_seconds=1.0, spec_augment=settings, seed=5,
    )  # fmt: skip
    clips = [0.3 * torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (4000, 2500)]
    keys = [ItemKey(1, 4), ItemKey(1, 9)]
    keyed = collator([Sample(audio=c, key=k) for c, k in zip(clips, keys)])
    plain = collator([Sample(audio=c) for c in clips])  # evaluation: never coloured
    for modality, features in keyed.inputs.items():
        mask = keyed.masks[modality]
        rngs = [sample_rng(5, 1, k.index, stream="filter_augment") for k in keys]
        expected = filter_augment(plain.inputs[modality], mask, rngs, p=1.0, bands=(2, 5), db=(-9.0, 9.0))
        torch.testing.assert_close(features, expected)
        assert not torch.equal(features, plain.inputs[modality])


def test_bad_settings_are_named() -> None:
    with pytest.raises(ConfigError, match="filter_augment_db"):
        AudioAugmentSettings(filter_augment_db=(6.0, -6.0))
    with pytest.raises(ConfigError, match="filter_augment_bands"):
        AudioAugmentSettings(filter_augment_bands=(0, 3))
    with pytest.raises(ConfigError, match="filter_augment_p"):
        AudioAugmentSettings(filter_augment_p=-0.1)
