"""Image loading against torch's antialiased bilinear resize; bad files; normalisation round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.data.image import denormalize_images, load_image, normalize_images
from polymodal.errors import DataError


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, size=(height // 4 + 1, width // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)
    return smooth[:height, :width].astype(np.uint8)


def test_no_resize_is_exact(tmp_path) -> None:
    pixels = _random_rgb(20, 30)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", height=20, width=30, channels=3)
    assert out.shape == (3, 20, 30) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), pixels.transpose(2, 0, 1) / 255.0, atol=1e-7)


def test_grey_conversion_matches_pillow_luma(tmp_path) -> None:
    pixels = _random_rgb(16, 16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", height=16, width=16, channels=1)
    # ITU-R 601 luma, as Pillow's L conversion, to within its integer rounding
    luma = (pixels @ np.array([0.299, 0.587, 0.114])) / 255.0
    assert out.shape == (1, 16, 16)
    np.testing.assert_allclose(out[0].numpy(), luma, atol=1.0 / 255)


@pytest.mark.parametrize(("src", "dst"), [((64, 96), (32, 48)), ((40, 40), (32, 96)), ((17, 23), (50, 70))])
def test_resize_matches_torch_antialiased_bilinear(tmp_path, src, dst) -> None:
    pixels = _random_rgb(*src, seed=3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    ours = load_image(tmp_path / "a.png", height=dst[0], width=dst[1], channels=3)
    reference = torch.from_numpy(pixels.transpose(2, 0, 1)[None] / 255.0).float()  # (1, 3, H, W)
    theirs = torch.nn.functional.interpolate(reference, size=dst, mode="bilinear", antialias=True)[0]
    assert ours.shape == (3, *dst)
    # Pillow rounds to 8 bits after resizing: at most one grey level apart
    assert (ours - theirs).abs().max() <= 1.0 / 255 + 1e-6


def test_16_bit_grey_is_scaled_not_clipped(tmp_path) -> None:
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    out = load_image(tmp_path / "deep.png", height=32, width=32, channels=1)
    np.testing.assert_allclose(out[0].numpy(), ramp / 65535.0, atol=1e-6)
    assert load_image(tmp_path / "deep.png", height=32, width=32, channels=3).shape == (3, 32, 32)


def test_palette_and_alpha_images_load(tmp_path) -> None:
    Image.fromarray(_random_rgb(12, 12)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(_random_rgb(12, 12)).convert("RGBA").save(tmp_path / "rgba.png")
    for name in ("p.png", "rgba.png"):
        for channels in (1, 3):
            out = load_image(tmp_path / name, height=8, width=8, channels=channels)
            assert out.shape == (channels, 8, 8) and 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("kind", ["missing", "truncated_png", "random_bytes", "empty"])
def test_bad_files_raise_data_error_naming_the_path(tmp_path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    if kind == "truncated_png":
        Image.fromarray(_random_rgb(64, 64)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # header intact, pixel data cut
        with Image.open(path) as lazy:
            assert lazy.size == (64, 64)  # Pillow opens it lazily without complaint
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    elif kind == "empty":
        path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        load_image(path, height=8, width=8)
    assert str(path) in str(info.value)


def test_bad_channels_is_explained(tmp_path) -> None:
    with pytest.raises(ValueError, match="channels=2"):
        load_image(tmp_path / "x.png", height=8, width=8, channels=2)


def test_normalize_round_trip_and_range() -> None:
    images = torch.rand(2, 3, 5, 7)
    normed = normalize_images(images)
    assert normed.min() >= -1.0 and normed.max() <= 1.0
    torch.testing.assert_close(normalize_images(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))
    torch.testing.assert_close(denormalize_images(normed), images)
