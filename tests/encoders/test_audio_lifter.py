"""Cepstral liftering in the audio encoder: the smoother equals scipy's DCT truncated and inverted;
it passes a slow spectral envelope and removes a fast ripple (a voice's pitch harmonics); it is a
symmetric projection; the encoder with it reads the same as the encoder fed pre-smoothed frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.fft import dct, idct

from polymodal.encoders.audio_conv import AudioConvEncoder, cepstral_smoother

MELS = 64


@pytest.mark.parametrize("keep", [1, 13, 20, MELS])
def test_equals_scipy_dct_truncated(keep):
    frames = np.random.default_rng(keep).normal(size=(7, MELS))
    coefficients = dct(frames, type=2, norm="ortho", axis=-1)
    coefficients[:, keep:] = 0.0
    expected = idct(coefficients, type=2, norm="ortho", axis=-1)
    got = torch.from_numpy(frames).float() @ cepstral_smoother(MELS, keep)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_keeps_an_envelope_and_removes_a_harmonic_ripple():
    band = np.arange(MELS)
    envelope = 3.0 * np.cos(np.pi * 2 * (band + 0.5) / MELS) - 0.02 * band  # slow: a few coefficients
    ripple = np.cos(np.pi * 40 * (band + 0.5) / MELS)  # coefficient 40: far above a lifter of 20
    smoother = cepstral_smoother(MELS, 20).double().numpy()
    smoothed = (envelope + ripple) @ smoother
    assert np.abs(ripple @ smoother).max() < 1e-6
    assert np.abs(smoothed - envelope).max() < 0.05 * np.abs(envelope).max()


def test_a_symmetric_projection():
    smoother = cepstral_smoother(MELS, 20)
    torch.testing.assert_close(smoother, smoother.T)
    torch.testing.assert_close(smoother @ smoother, smoother, atol=1e-5, rtol=0)
    assert round(float(torch.trace(smoother))) == 20  # its rank: the coefficients kept


def test_encoder_reads_pre_smoothed_frames_alike():
    torch.manual_seed(0)
    lifted = AudioConvEncoder(MELS, dim=32, input_norm=False, freq_channels=4, lifter=20).eval()
    plain = AudioConvEncoder(MELS, dim=32, input_norm=False, freq_channels=4).eval()
    plain.load_state_dict(lifted.state_dict())  # the smoother is not in the state dict
    x = torch.randn(2, 30, MELS)
    mask = torch.arange(30)[None] < torch.tensor([30, 17])[:, None]
    x = x.masked_fill(~mask[..., None], 0.0)
    torch.testing.assert_close(lifted(x, mask).tokens, plain(x @ cepstral_smoother(MELS, 20), mask).tokens)


def test_a_lifter_of_every_band_or_more_changes_nothing():
    torch.manual_seed(0)
    plain = AudioConvEncoder(MELS, dim=32, freq_channels=4).eval()
    x = torch.randn(2, 30, MELS)
    for keep in (MELS, MELS + 7):
        wide = AudioConvEncoder(MELS, dim=32, freq_channels=4, lifter=keep).eval()
        wide.load_state_dict(plain.state_dict())
        assert wide.smoother is None
        assert torch.equal(wide(x).tokens, plain(x).tokens)


def test_rejects_a_negative_lifter():
    with pytest.raises(ValueError, match="lifter must be >= 0"):
        AudioConvEncoder(MELS, lifter=-1)
