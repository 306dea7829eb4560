"""Image front end: read a file into a (C, H, W) tensor in [0, 1], and the model's normalisation.

Resizing uses Pillow's bilinear filter, which widens its support when shrinking (antialiasing), so
downscaled text and digits do not alias; ``torch.nn.functional.interpolate(mode="bilinear",
antialias=True)`` computes the same filter.

Files are untrusted input: whatever a damaged or hostile file makes Pillow raise becomes a
``DataError`` naming the path, and an image over Pillow's decompression-bomb limit is refused
before its pixels are decoded (Pillow itself only warns between that limit and twice it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from polymodal.data.files import is_file
from polymodal.errors import DataError

# Fixed, data-agnostic normalisation: maps [0, 1] to [-1, 1], so the first layer sees inputs
# centred on 0 whatever the dataset, and a decoder with a tanh-range output predicts the same
# scale. Per-dataset statistics (ImageNet's) would have to be measured and stored with every run.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
PIXEL_MAX = 255.0  # 8-bit images
PIXEL_MAX_16BIT = 65535.0  # 16-bit grey PNGs
PIL_MODES = {1: "L", 3: "RGB"}  # channels -> Pillow mode


def load_image(path: str | Path, *, height: int, width: int, channels: int = 1) -> Tensor:
    """Read an image, convert it to grey (1 channel) or RGB (3), resize to ``height`` x ``width``.

    Args:
        path: any format Pillow reads (PNG, JPEG, ...).
        height: output rows.
        width: output columns.
        channels: 1 (grey) or 3 (RGB).

    Returns:
        (C, H, W) float32 in [0, 1].

    Raises:
        DataError: naming the path, when the file is missing, truncated or not an image.
    """
    if channels not in PIL_MODES:
        raise ValueError(f"channels={channels} is not supported; use 1 (grey) or 3 (RGB)")
    path = Path(path)
    if not is_file(path):
        raise DataError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            # Pillow's decompression-bomb limit (about 89M pixels, 0.25 GiB as RGB), read at each call
            # so that a program raising Pillow's limit raises ours; None switches both off.
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise DataError(
                    f"image file {path} is {img.width} x {img.height} pixels, over the decompression-bomb limit "
                    f"of {limit} (PIL.Image.MAX_IMAGE_PIXELS); shrink it"
                )
            # Pillow decodes lazily: a truncated file only fails here, so load inside the try.
            img.load()
            if img.mode.startswith("I;16"):
                # 16-bit grey: Pillow's convert("L") would clip at 255, so scale in float ("F" mode).
                grey = np.asarray(img, dtype=np.float32) / PIXEL_MAX_16BIT  # (H, W)
                img = Image.fromarray(grey)  # float32 -> mode "F"
                scale = 1.0
            else:
                img = img.convert(PIL_MODES[channels])  # palette, alpha, CMYK ... -> L or RGB
                scale = PIXEL_MAX
            if img.size != (width, height):
                img = img.resize((width, height), resample=Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / scale  # (H, W) or (H, W, C)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001  Pillow's decoders raise OSError, SyntaxError, EOFError,
        # struct.error, IndexError, MemoryError ... for damaged files; each is a bad file here.
        raise DataError(f"image file {path} is truncated or not a readable image: {type(exc).__name__}: {exc}") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]  # (H, W) -> (H, W, 1)
    if pixels.shape[2] != channels:
        pixels = np.repeat(pixels, channels, axis=2)  # 16-bit grey read as RGB: (H, W, 1) -> (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # (H, W, C) -> (C, H, W)


def normalize_images(images: Tensor) -> Tensor:
    """(..., C, H, W) in [0, 1] -> the same shape in [-1, 1]."""
    return (images - IMAGE_MEAN) / IMAGE_STD


def denormalize_images(images: Tensor) -> Tensor:
    """Inverse of ``normalize_images``: [-1, 1] -> [0, 1] (not clamped)."""
    return images * IMAGE_STD + IMAGE_MEAN
