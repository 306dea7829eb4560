"""The built-in spoken-numbers data: determinism, cache, split hygiene, modalities, and the CLI."""

import argparse
import dataclasses

import numpy as np
import pytest
import soundfile
from PIL import Image

from polymodal.cli import data as data_cli
from polymodal.datasets.spoken_numbers import flite
from polymodal.datasets.spoken_numbers.mnist import load_mnist
from polymodal.datasets.spoken_numbers.numbers import parse_number
from polymodal.datasets.spoken_numbers.build import SPLIT_NAMES, build_spoken_numbers

NUM = 200


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cache_dir):
    return build_spoken_numbers(num_samples=NUM, seed=0, cache_dir=cache_dir)


def assert_identical(a, b):
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, field.name
            assert x.tobytes() == y.tobytes(), field.name
        else:
            assert x == y, field.name


def test_same_seed_identical_and_other_seed_differs(data):
    again = build_spoken_numbers(num_samples=NUM, seed=0, use_cache=False, num_workers=1)
    assert_identical(data, again)
    other = build_spoken_numbers(num_samples=NUM, seed=1, use_cache=False)
    assert not np.array_equal(data.labels, other.labels)
    assert not np.array_equal(data.images, other.images)


def test_cached_equals_uncached(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path))
    built = build_spoken_numbers(num_samples=60, seed=4)
    entries = list(tmp_path.glob("spoken_numbers-*.npz"))
    assert len(entries) == 1  # written under $POLYMODAL_CACHE, no temporary left behind
    assert list(tmp_path.iterdir()) == entries
    loaded = build_spoken_numbers(num_samples=60, seed=4)
    fresh = build_spoken_numbers(num_samples=60, seed=4, use_cache=False)
    assert_identical(built, loaded)
    assert_identical(fresh, loaded)
    build_spoken_numbers(num_samples=60, seed=4, image_width=100)  # another parameter, another entry
    assert len(list(tmp_path.glob("spoken_numbers-*.npz"))) == 2


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    built = build_spoken_numbers(num_samples=30, seed=2, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.npz")
    entry.write_bytes(b"not a zip file")
    assert_identical(built, build_spoken_numbers(num_samples=30, seed=2, cache_dir=tmp_path))


def test_split_sizes_and_shapes(data):
    n = len(data)
    assert data.images.shape == (n, 32, 96) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and data.splits.dtype == np.int8
    assert data.digit_sources.shape == (n, 3) and data.digit_sources.dtype == np.int32
    assert data.audio.dtype == np.int16 and data.audio_offsets.shape == (n + 1,)
    assert len(data.captions) == len(data.voices) == n
    counts = [data.split_indices(name).size for name in SPLIT_NAMES]
    assert counts == [160, 20, 20]
    indices = np.concatenate([data.split_indices(name) for name in SPLIT_NAMES])
    assert np.array_equal(np.sort(indices), np.arange(n))


def test_numbers_and_their_digit_images(data):
    mnist_images, mnist_labels = load_mnist()
    for number, sources in zip(data.labels, data.digit_sources):
        text = str(int(number))
        assert 1 <= len(text) <= 3
        assert np.all(sources[len(text) :] == -1) and np.all(sources[: len(text)] >= 0)
        # every digit image is a real MNIST image of that digit
        assert [int(mnist_labels[s]) for s in sources[: len(text)]] == [int(c) for c in text]
    lengths = np.array([len(str(int(n))) for n in data.labels])
    assert set(lengths) == {1, 2, 3}


def test_splits_use_disjoint_mnist_pools():
    data = build_spoken_numbers(num_samples=600, seed=3, use_cache=False)
    pools = []
    for name in SPLIT_NAMES:
        sources = data.digit_sources[data.split_indices(name)]
        pools.append(set(sources[sources >= 0].tolist()))
    assert not pools[0] & pools[1] and not pools[0] & pools[2] and not pools[1] & pools[2]
    assert len(pools[0]) > 5 * len(pools[1])


def test_heldout_numbers(data):
    heldout = data.heldout_numbers
    assert np.all(np.diff(heldout) > 0)  # sorted, distinct
    assert np.all(heldout >= 10)  # multi-digit only
    assert heldout.size == round(0.05 * 90) + round(0.05 * 900)
    is_heldout = np.isin(data.labels, heldout)
    assert not is_heldout[data.split_indices("train")].any()
    for name in ("val", "test"):
        share = is_heldout[data.split_indices(name)].mean()
        assert 0.1 <= share <= 0.2, (name, share)
    other = build_spoken_numbers(num_samples=NUM, seed=1, use_cache=False)
    assert not np.array_equal(other.heldout_numbers, heldout)  # chosen by the seed


def test_single_digit_data_has_nothing_held_out():
    data = build_spoken_numbers(num_samples=20, seed=0, max_digits=1, use_cache=False)
    assert data.heldout_numbers.size == 0 and data.labels.max() <= 9


def test_captions_name_their_number(data):
    for caption, number in zip(data.captions, data.labels):
        assert parse_number(caption) == number, caption
    assert len(set(data.captions)) > NUM // 3


def test_images_keep_digits_whole_and_inside(data):
    assert np.all(data.images[:, 0, :] == 0) and np.all(data.images[:, -1, :] == 0)
    assert np.all(data.images[:, :, 0] == 0) and np.all(data.images[:, :, -1] == 0)
    ink = (data.images > 0).sum(axis=(1, 2))
    lengths = np.array([len(str(int(n))) for n in data.labels])
    assert ink.min() > 40  # every digit legible, none scaled to a speck
    assert ink[lengths == 3].mean() > ink[lengths == 1].mean()


def test_wider_canvas_more_digits():
    data = build_spoken_numbers(num_samples=30, seed=0, max_digits=5, image_height=28, image_width=160, use_cache=False)
    assert data.images.shape[1:] == (28, 160) and data.digit_sources.shape[1] == 5
    assert np.all(data.images[:, :, -1] == 0) and np.all(data.images[:, -1, :] == 0)


def test_speech_properties(data):
    assert data.sample_rate == 16000
    seconds = np.diff(data.audio_offsets) / data.sample_rate
    assert seconds.min() > 0.1 and seconds.max() < 2.5
    for i in range(0, NUM, 3):  # nothing recorded by default: every utterance at espeak's level
        assert np.abs(data.speech(i)).max() > 0.5 * 32768
    lengths = np.array([len(str(int(n))) for n in data.labels])
    assert seconds[lengths == 3].mean() > seconds[lengths == 2].mean() > seconds[lengths == 1].mean()
    assert len(set(data.voices)) > NUM // 2
    assert len(np.unique(data.rates)) > 10 and len(np.unique(data.pitches)) > 10
    # the same number in two different voices: two different waveforms
    same = [np.flatnonzero(data.labels == n) for n in np.unique(data.labels)]
    pair = next(p for p in same if p.size >= 2)
    assert data.voices[pair[0]] != data.voices[pair[1]]
    assert data.speech(pair[0]).tobytes() != data.speech(pair[1]).tobytes()


def test_torch_samples(data):
    val = data.split("val")
    assert len(val) == 20
    index = int(data.split_indices("val")[3])
    sample = val[3]
    assert sample.image.shape == (1, 32, 96) and str(sample.image.dtype) == "torch.float32"
    assert 0.0 <= float(sample.image.min()) and float(sample.image.max()) <= 1.0
    assert np.allclose(sample.image[0].numpy() * 255, data.images[index])
    assert sample.audio.ndim == 1 and str(sample.audio.dtype) == "torch.float32"
    assert float(sample.audio.abs().max()) <= 1.0
    assert np.allclose(sample.audio.numpy() * 32768, data.speech(index))
    assert sample.text == data.captions[index] and sample.label == int(data.labels[index])


def test_bad_split_name(data):
    with pytest.raises(ValueError, match="valid: train, val, test"):
        data.split("validation")
    with pytest.raises(ValueError, match="valid: train, val, test"):
        data.split_indices("dev")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_digits": 3, "image_width": 40}, "image_width >= "),
        ({"max_digits": 7}, "max_digits must be in 1..6"),
        ({"num_samples": 5}, "num_samples must be at least"),
        ({"image_height": 8}, "image_height must be at least"),
    ],
)
def test_bad_parameters_are_named(kwargs, message):
    args = {"num_samples": 100, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_spoken_numbers(**args, use_cache=False)


def test_stats(data):
    stats = data.stats()
    assert stats["samples"] == NUM
    assert sum(s["samples"] for s in stats["splits"].values()) == NUM
    assert stats["splits"]["train"]["heldout_samples"] == 0
    assert stats["splits"]["val"]["heldout_samples"] > 0 and stats["splits"]["test"]["heldout_samples"] > 0
    assert sum(stats["digit_lengths"].values()) == NUM
    audio = stats["audio_seconds"]
    assert audio["min"] <= audio["mean"] <= audio["max"]


def test_cli_writes_preview(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POLYMODAL_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    data_cli.add_arguments(parser)
    out = tmp_path / "preview"
    args = parser.parse_args(["data.options.num_samples=100", "seed=0", "--out", str(out)])
    assert data_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "100 samples" in printed and "held-out" in printed and "ready in" in printed
    with Image.open(out / "samples.png") as grid:
        grid.load()
        assert grid.width > 4 * 96 and grid.height > 8 * 32
    wavs = sorted(out.glob("*.wav"))
    assert 4 <= len(wavs) <= 8
    for path in wavs:
        wave, rate = soundfile.read(path)
        assert rate == 16000 and np.abs(wave).max() > 0.05  # recorded training speech sits down to -20 dB
        number = int(path.name.split("_")[0])
        assert 0 <= number <= 999


def test_recorded_share_changes_training_speech_only():
    """Built clean (share 0) and with every training utterance recorded (share 1): validation and
    test speech, images and captions are byte-identical; every training utterance differs."""
    clean = build_spoken_numbers(num_samples=60, seed=5, recorded_share=0.0, use_cache=False)
    recorded = build_spoken_numbers(num_samples=60, seed=5, recorded_share=1.0, use_cache=False)
    assert clean.images.tobytes() == recorded.images.tobytes() and clean.captions == recorded.captions
    for i, split in enumerate(clean.splits):
        same = np.array_equal(clean.speech(i), recorded.speech(i))
        assert same == (split != 0), (i, SPLIT_NAMES[split])
    peaks = np.array([np.abs(recorded.speech(i)).max() for i in np.flatnonzero(recorded.splits == 0)]) / 32768
    assert peaks.min() < 0.3 < peaks.max()  # recorded at -20..0 dB
    with pytest.raises(ValueError, match="recorded_share"):
        build_spoken_numbers(num_samples=60, seed=5, recorded_share=1.5, use_cache=False)


@pytest.mark.skipif(not flite.available(), reason="flite is not installed (apt-get install flite)")
def test_flite_share_changes_training_speech_only():
    """Every training utterance spoken by flite (share 1): validation and test speech, images and
    captions are byte-identical to the espeak-only build; every training utterance differs and
    stays inside the data's 2 s crop, recorded or not."""
    espeak = build_spoken_numbers(num_samples=60, seed=5, use_cache=False)
    spoken = build_spoken_numbers(num_samples=60, seed=5, flite_share=1.0, recorded_share=0.5, use_cache=False)
    assert espeak.images.tobytes() == spoken.images.tobytes() and espeak.captions == spoken.captions
    for i, split in enumerate(espeak.splits):
        assert np.array_equal(espeak.speech(i), spoken.speech(i)) == (split != 0), (i, SPLIT_NAMES[split])
        assert spoken.speech(i).size <= 2 * 16000
    with pytest.raises(ValueError, match="flite_share"):
        build_spoken_numbers(num_samples=60, seed=5, flite_share=-0.1, use_cache=False)
