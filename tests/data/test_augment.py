"""The augmentation key: ``sample_rng`` gives equal draws for equal (seed, epoch, index, stream)
and independent ones otherwise; ``augment_sample`` replays exactly for a key, leaves text, label
and absent modalities alone, and changes nothing when no transform is configured."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polymodal.data.augment import (
    AugmentSettings,
    AudioAugmentSettings,
    ImageAugmentSettings,
    augment_sample,
    sample_rng,
)
from polymodal.data.batch import Sample

RATE = 16000
ON = AugmentSettings(
    audio=AudioAugmentSettings(speed_p=1.0, noise_p=1.0, gain_p=1.0),
    image=ImageAugmentSettings(affine_p=1.0, elastic_p=1.0),
)


def _sample() -> Sample:
    torch.manual_seed(0)
    image = torch.zeros(1, 32, 96)
    image[:, 8:24, 20:70] = 1.0
    audio = 0.3 * torch.sin(torch.arange(8000) * 0.05)
    return Sample(image=image, text="forty two", audio=audio, label=42)


def test_equal_keys_draw_equal_numbers_and_every_part_of_the_key_matters():
    draws = lambda *key, stream="audio": sample_rng(*key, stream=stream).random(4)  # noqa: E731
    np.testing.assert_array_equal(draws(3, 1, 17), draws(3, 1, 17))
    others = [draws(4, 1, 17), draws(3, 2, 17), draws(3, 1, 18), draws(3, 1, 17, stream="image")]
    for other in others:
        assert not np.allclose(other, draws(3, 1, 17))
    # Swapping epoch and index is another key, not the same one.
    assert not np.allclose(draws(3, 1, 2), draws(3, 2, 1))
    with pytest.raises(ValueError, match="valid: audio, image, spec_augment"):
        sample_rng(0, 0, 0, stream="text")
    with pytest.raises(ValueError, match=">= 0"):
        sample_rng(0, -1, 0, stream="audio")


def test_augment_sample_replays_for_a_key_and_leaves_the_rest():
    sample = _sample()
    a = augment_sample(sample, ON, seed=1, epoch=0, index=5, sample_rate=RATE)
    b = augment_sample(sample, ON, seed=1, epoch=0, index=5, sample_rate=RATE)
    c = augment_sample(sample, ON, seed=1, epoch=1, index=5, sample_rate=RATE)
    assert torch.equal(a.image, b.image) and torch.equal(a.audio, b.audio)
    assert not torch.equal(a.image, c.image)
    assert (a.text, a.label) == (sample.text, sample.label)
    assert not torch.equal(a.image, sample.image) and torch.equal(sample.image, _sample().image)  # input kept


def test_nothing_configured_changes_nothing_and_absent_modalities_stay_absent():
    sample = _sample()
    same = augment_sample(sample, AugmentSettings(), seed=0, epoch=0, index=0, sample_rate=RATE)
    assert torch.equal(same.image, sample.image) and torch.equal(same.audio, sample.audio)
    text_only = augment_sample(Sample(text="seven", label=7), ON, seed=0, epoch=0, index=0, sample_rate=RATE)
    assert text_only == Sample(text="seven", label=7)


def test_the_settings_load_and_dump_through_the_config_machinery():
    """The lead nests AugmentSettings in the config tree as ``data.augment``: YAML-shaped dicts in,
    the same dicts out, bad values named by their key."""
    from polymodal.config import from_dict, to_dict
    from polymodal.errors import ConfigError

    raw = {"audio": {"speed_p": 0.5, "noise_snr_db": [0, 15], "noise_weights": [1, 0, 2]}, "image": {"affine_p": 1}}
    settings = from_dict(AugmentSettings, raw, "data.augment")
    assert settings.audio.noise_snr_db == (0.0, 15.0) and settings.image.affine_p == 1.0
    assert from_dict(AugmentSettings, to_dict(settings), "data.augment") == settings
    with pytest.raises(ConfigError, match=r"data\.augment\.audio\.speed_range"):
        from_dict(AugmentSettings, {"audio": {"speed_range": [0.9]}}, "data.augment")
    with pytest.raises(ConfigError, match="unknown config key 'data.augment.image.blur_p'"):
        from_dict(AugmentSettings, {"image": {"blur_p": 0.5}}, "data.augment")
