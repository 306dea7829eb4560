"""Fuzzed image and audio files. Images: every Pillow mode and format we can write (1x1 to 64x64,
CMYK, 16-bit, animated), truncated or with flipped bytes, and decompression bombs. Audio: 0
samples, NaN and infinite floats, up to 8 channels, 1 kHz to 768 kHz, long files cut, truncated or
flipped bytes. An intact file always loads, in range and at the asked size; a damaged one loads or
raises a DataError naming its path; nothing else escapes."""

from __future__ import annotations

import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from polymodal.data.audio import MAX_FILE_RATE, load_audio
from polymodal.data.image import load_image
from polymodal.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from contract import FAST, FUZZED, SLOW, write_png_header_only  # noqa: E402

HEIGHT, WIDTH = 12, 20
# Modes each format writes (Pillow 10+): what a user's folder of images may hold.
FORMAT_MODES = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"],
    "JPEG": ["L", "RGB", "CMYK"],
    "GIF": ["L", "P"],
    "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I;16", "I", "F"],
    "BMP": ["1", "L", "P", "RGB"],
    "WEBP": ["RGB", "RGBA"],
}
ANIMATED = ("PNG", "GIF", "WEBP", "TIFF")
WANTED_RATE = 8000
MAX_SECONDS = 0.25


@st.composite
def damage(draw, size: int) -> tuple[int | None, list[tuple[int, int]]]:
    """Where to cut the file (None: whole) and which bytes to overwrite."""
    cut = draw(st.none() | st.integers(min_value=0, max_value=max(size - 1, 0)))
    flips = draw(st.lists(st.tuples(st.integers(0, max(size - 1, 0)), st.integers(0, 255)), max_size=4))
    return cut, flips


def apply_damage(path: Path, cut: int | None, flips: list[tuple[int, int]]) -> bool:
    """Damage the file in place; True when it changed."""
    data = bytearray(path.read_bytes())
    original = bytes(data)
    for position, value in flips:
        if position < len(data):
            data[position] = value
    if cut is not None:
        data = data[:cut]
    path.write_bytes(bytes(data))
    return bytes(data) != original


@st.composite
def image_specs(draw) -> dict:
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    return dict(
        fmt=fmt,
        mode=draw(st.sampled_from(FORMAT_MODES[fmt])),
        size=(draw(st.integers(1, 64)), draw(st.integers(1, 64))),
        frames=draw(st.integers(1, 3)) if fmt in ANIMATED else 1,
        seed=draw(st.integers(0, 2**16)),
        channels=draw(st.sampled_from([1, 3])),
        damaged=draw(st.booleans()),
        damage=draw(damage(4096)),
    )


def _frame(mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    width, height = size
    if mode in ("I;16", "I"):
        top = 65535 if mode == "I;16" else 2**20
        pixels = rng.integers(0, top, size=(height, width)).astype(np.uint16 if mode == "I;16" else np.int32)
        return Image.fromarray(pixels)  # uint16 -> "I;16", int32 -> "I"
    if mode == "F":
        return Image.fromarray(rng.random((height, width)).astype(np.float32) * 255)
    rgb = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    return rgb.convert(mode) if mode != "P" else rgb.convert("P", palette=Image.Palette.ADAPTIVE)


def check_image(spec: dict) -> None:
    FUZZED["image"] += 1
    rng = np.random.default_rng(spec["seed"])
    frames = [_frame(spec["mode"], spec["size"], rng) for _ in range(spec["frames"])]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz.{spec['fmt'].lower()}"
        extra = {"save_all": True, "append_images": frames[1:]} if len(frames) > 1 else {}
        try:
            frames[0].save(path, format=spec["fmt"], **extra)
        except (OSError, ValueError, KeyError):  # a mode this Pillow cannot write in this format
            assume(False)
        changed = spec["damaged"] and apply_damage(path, *spec["damage"])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow warns about some damaged files it still reads
                pixels = load_image(path, height=HEIGHT, width=WIDTH, channels=spec["channels"])
        except DataError as exc:
            assert changed, f"an intact {spec['fmt']} {spec['mode']} image was refused: {exc}"
            assert str(path) in str(exc)
            return
    assert pixels.shape == (spec["channels"], HEIGHT, WIDTH) and pixels.dtype == torch.float32
    assert pixels.isfinite().all() and pixels.min() >= 0 and pixels.max() <= 1


@FAST
@given(spec=image_specs())
def test_fuzzed_images_load_or_raise_data_error(spec):
    check_image(spec)


@pytest.mark.slow
@SLOW
@given(spec=image_specs())
def test_fuzzed_images_load_or_raise_data_error_many(spec):
    check_image(spec)


@pytest.mark.parametrize(("width", "height", "refused_by"), [(20_000, 20_000, "DecompressionBombError"),
                                                              (10_000, 10_000, "decompression-bomb limit")])
def test_decompression_bombs_are_refused_before_decoding(tmp_path, width, height, refused_by):
    # 400M pixels: Pillow refuses at open. 100M: Pillow only warns, and would decode 100 MB; refused.
    path = write_png_header_only(tmp_path / "bomb.png", width=width, height=height)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(DataError, match=refused_by) as caught:
            load_image(path, height=HEIGHT, width=WIDTH)
    assert str(path) in str(caught.value)


# ----------------------------------------------------------------------------- audio

SUBTYPES = {"WAV": ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"], "FLAC": ["PCM_16", "PCM_24"]}
RATES = [1000, 8000, 16000, 22050, 44100, 48000, 96000, 192000, 768000]
FLAC_MAX_RATE = 655_350


@st.composite
def audio_specs(draw) -> dict:
    fmt = draw(st.sampled_from(sorted(SUBTYPES)))
    subtype = draw(st.sampled_from(SUBTYPES[fmt]))
    rate = draw(st.sampled_from([r for r in RATES if fmt != "FLAC" or r <= FLAC_MAX_RATE]))
    return dict(
        fmt=fmt,
        subtype=subtype,
        rate=rate,
        channels=draw(st.integers(1, 8)),
        seconds=draw(st.sampled_from([0.0, 1 / rate, 0.01, 0.2, 0.6])),  # 0 samples, 1 sample ... longer than kept
        poison=draw(st.sampled_from([None, "nan", "inf"])) if subtype in ("FLOAT", "DOUBLE") else None,
        seed=draw(st.integers(0, 2**16)),
        damaged=draw(st.booleans()),
        damage=draw(damage(2048)),
    )


def check_audio(spec: dict) -> None:
    FUZZED["audio"] += 1
    rng = np.random.default_rng(spec["seed"])
    frames = int(round(spec["seconds"] * spec["rate"]))
    wave = (rng.random((frames, spec["channels"])) * 1.8 - 0.9).astype(np.float64)  # (T, channels)
    if spec["poison"] and frames:
        wave[rng.integers(0, frames), 0] = float(spec["poison"])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzz.{spec['fmt'].lower()}"
        soundfile.write(path, wave, spec["rate"], subtype=spec["subtype"], format=spec["fmt"])
        changed = spec["damaged"] and apply_damage(path, *spec["damage"])
        try:
            clip = load_audio(path, sample_rate=WANTED_RATE, max_seconds=MAX_SECONDS)
        except DataError as exc:
            assert str(path) in str(exc)
            assert changed or frames == 0 or spec["poison"], f"an intact file was refused: {exc}"
            return
    cap = int(round(MAX_SECONDS * WANTED_RATE))
    assert clip.ndim == 1 and clip.dtype == torch.float32 and 0 < clip.shape[0] <= cap
    assert clip.isfinite().all()
    if not changed:
        g = math.gcd(spec["rate"], WANTED_RATE)
        assert clip.shape[0] == min(math.ceil(frames * (WANTED_RATE // g) / (spec["rate"] // g)), cap)


@FAST
@given(spec=audio_specs())
def test_fuzzed_audio_loads_or_raises_data_error(spec):
    check_audio(spec)


@pytest.mark.slow
@SLOW
@given(spec=audio_specs())
def test_fuzzed_audio_loads_or_raises_data_error_many(spec):
    check_audio(spec)


def test_a_long_file_read_up_to_the_cut_equals_the_whole_file_cut(tmp_path):
    # Two ways: read 0.25 s (and the filter margin) of a 3 s file, or all of it and then cut.
    for rate in (44100, 96000, 11025):
        path = tmp_path / f"long_{rate}.wav"
        wave = np.random.default_rng(rate).standard_normal((3 * rate, 2)) * 0.1
        soundfile.write(path, wave, rate, subtype="FLOAT")
        cut = load_audio(path, sample_rate=WANTED_RATE, max_seconds=MAX_SECONDS)
        whole = load_audio(path, sample_rate=WANTED_RATE)
        assert cut.shape[0] == int(MAX_SECONDS * WANTED_RATE)
        torch.testing.assert_close(cut, whole[: cut.shape[0]], rtol=0, atol=1e-6)


def test_an_implausible_rate_in_the_header_is_refused(tmp_path):
    path = tmp_path / "rate.wav"
    soundfile.write(path, np.zeros(100, dtype=np.float32), 16000, subtype="FLOAT")
    data = bytearray(path.read_bytes())
    data[24:28] = (2_000_000_000).to_bytes(4, "little")  # the fmt chunk's sample rate
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{path} declares 2000000000 Hz, outside 1000-{MAX_FILE_RATE} Hz"):
        load_audio(path, sample_rate=WANTED_RATE)
