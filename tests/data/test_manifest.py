"""ManifestDataset: good samples load, bad lines and bad files are skipped, counted and named."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polymodal.data.audio import load_audio
from polymodal.data.image import load_image
from polymodal.data.manifest import ManifestDataset
from polymodal.errors import DataError

SETTINGS = dict(image_height=16, image_width=24, channels=1, sample_rate=8000, max_audio_seconds=0.5)


def _write_png(path, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 48), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_wav(path, seconds: float, sample_rate: int = 8000) -> None:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    soundfile.write(path, (0.4 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sample_rate, subtype="FLOAT")


@pytest.fixture
def messy(tmp_path):
    """A manifest with one good line and every kind of trouble."""
    media = tmp_path / "media"
    media.mkdir()
    _write_png(media / "good.png")
    _write_wav(media / "good.wav", seconds=1.0)  # longer than max_audio_seconds: cut
    _write_png(media / "trunc.png", seed=1)
    data = (media / "trunc.png").read_bytes()
    (media / "trunc.png").write_bytes(data[: len(data) // 2])
    (media / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    lines = [
        json.dumps({"image": "media/good.png", "text": "seven", "audio": "media/good.wav", "label": 7}),
        json.dumps({"image": "media/missing.png", "text": "gone"}),
        json.dumps({"image": "media/trunc.png"}),
        json.dumps({"audio": "media/corrupt.wav", "text": "noise"}),
        json.dumps({"label": 3}),  # no modality
        '{"image": "media/good.png", "text": ',  # bad JSON
        "",  # blank lines are ignored, not errors
        json.dumps({"text": "caption only"}),
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_messy_manifest(messy, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="polymodal.data.manifest"):
        dataset = ManifestDataset(messy, **SETTINGS)
        assert len(dataset) == 5  # the two bad lines are dropped at read time
        assert dataset.num_skipped == 2
        assert set(dataset.skipped) == {f"{messy}:5", f"{messy}:6"}
        assert "no modality" in dataset.skipped[f"{messy}:5"]
        assert "not valid JSON" in dataset.skipped[f"{messy}:6"]

        samples = [dataset[i] for i in range(len(dataset))]
        assert [s is None for s in samples] == [False, True, True, True, False]
        assert dataset.num_skipped == 5
        media = messy.parent / "media"
        for name, reason in [("missing.png", "does not exist"), ("trunc.png", "truncated"), ("corrupt.wav", "corrupt")]:
            assert reason in dataset.skipped[str(media / name)]
        samples_again = [dataset[i] for i in range(len(dataset))]  # reloading a bad file warns once only
        assert [s is None for s in samples_again] == [s is None for s in samples]
        assert dataset.num_skipped == 5
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5
    assert sum("trunc.png" in w for w in warnings) == 1

    good = samples[0]
    assert good.label == 7 and good.text == "seven"
    torch.testing.assert_close(good.image, load_image(media / "good.png", height=16, width=24))
    assert good.image.shape == (1, 16, 24)
    full = load_audio(media / "good.wav", sample_rate=8000)
    assert full.shape == (8000,) and good.audio.shape == (4000,)  # cut to 0.5 s
    torch.testing.assert_close(good.audio, full[:4000])
    caption_only = samples[4]
    assert caption_only.text == "caption only" and caption_only.image is None and caption_only.audio is None
    assert caption_only.label == -1


def test_scan_lists_every_bad_file(messy) -> None:
    dataset = ManifestDataset(messy, **SETTINGS)
    assert dataset.scan() == 2
    assert dataset.num_skipped == 5 and len(dataset.skipped) == 5


def test_absolute_paths_and_resampling(tmp_path) -> None:
    _write_wav(tmp_path / "a.wav", seconds=0.2, sample_rate=16000)
    path = tmp_path / "sub" / "m.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"audio": str(tmp_path / "a.wav")}) + "\n")
    sample = ManifestDataset(path, **SETTINGS)[0]
    assert sample.audio.shape == (1600,)  # 0.2 s at 8 kHz


def test_missing_manifest_names_it(tmp_path) -> None:
    with pytest.raises(DataError) as info:
        ManifestDataset(tmp_path / "nope.jsonl", **SETTINGS)
    assert "nope.jsonl" in str(info.value)


def test_media_all_missing_is_an_error_that_names_the_folder(tmp_path) -> None:
    """Paths written relative to another folder: every file missing stops at once, one missing is a skip."""
    (tmp_path / "clips").mkdir()
    _write_wav(tmp_path / "clips" / "a.wav", seconds=0.2)
    path = tmp_path / "lists" / "m.jsonl"
    path.parent.mkdir()
    lines = [{"audio": "clips/a.wav", "text": "a"}, {"audio": "clips/b.wav", "text": "b"}, {"text": "c"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataError) as info:
        ManifestDataset(path, **SETTINGS)
    message = str(info.value)
    assert str(path.parent / "clips" / "a.wav") in message and f"folder {path.parent}" in message

    lines[0]["audio"] = "../clips/a.wav"  # now one of the two exists: the other is skipped when loaded
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = ManifestDataset(path, **SETTINGS)
    assert [dataset[i] is None for i in range(3)] == [False, True, False]
    assert dataset.num_skipped == 1


def test_manifest_without_usable_lines(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"label": 1}\n[1, 2]\n{"image": 5}\n{"text": "x", "lable": 3}\n')
    with pytest.raises(DataError, match="no usable line"):
        ManifestDataset(path, **SETTINGS)


def test_each_bad_line_kind_has_a_reason(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    lines = ['{"text": "fine"}', "[1, 2]", '{"image": 5}', '{"text": "x", "imgae": "a.png"}', '{"text": "x", "label": "3"}']
    path.write_text("\n".join(lines) + "\n")
    dataset = ManifestDataset(path, **SETTINGS)
    assert len(dataset) == 1 and dataset.num_skipped == 4
    reasons = [dataset.skipped[f"{path}:{n}"] for n in (2, 3, 4, 5)]
    for reason, expected in zip(reasons, ["JSON object", "must be a string", "did you mean 'image'", "integer"]):
        assert expected in reason


def test_other_fields_are_kept_as_metadata(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    lines = [
        {"text": "three", "label": 3, "speaker": "george", "take": 7},
        {"text": "four", "colour": {"name": "red"}},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = ManifestDataset(path, **SETTINGS)
    assert len(dataset) == 2 and dataset.num_skipped == 0
    assert dataset.metadata(0) == {"speaker": "george", "take": 7}
    assert dataset.metadata(1) == {"colour": {"name": "red"}}
    assert dataset[0].text == "three" and dataset[0].label == 3
