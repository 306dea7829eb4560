"""Drawing the built-in data's images: real MNIST digits (``mnist.py``) cropped to their ink,
scaled and placed left to right with jittered gaps and heights, always whole and inside the canvas;
and the reference handwriting text -> image learns from (every layout draw at mid-range).

Each digit's MNIST box (LeCun et al. 1998 fit every digit in a 20x20 box) becomes 60..90% of the
image height; the layout's random numbers are drawn at once for a whole split (``draw_layouts``),
so drawing is arithmetic and a seed gives byte-identical images whatever the number of workers.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from polymodal.datasets.spoken_numbers.mnist import load_mnist

MNIST_BOX = 20  # MNIST digits were size-normalised to fit a 20x20 box (LeCun et al. 1998)
BOX_HEIGHT_RANGE = (0.6, 0.9)  # that box's side as a fraction of the image height
GAP_RANGE = (0.02, 0.12)  # horizontal gap between digits, fraction of the image height
MARGIN = 1  # pixels kept clear on every side
MIN_BOX = 12  # pixels: below this, digits stop being legible
INK_LEVEL = 0  # a pixel above this is ink (for cropping)


def crop_to_ink(image: np.ndarray) -> np.ndarray:
    """(28, 28) -> (h, w) the bounding box of the ink."""
    rows = np.flatnonzero((image > INK_LEVEL).any(axis=1))
    cols = np.flatnonzero((image > INK_LEVEL).any(axis=0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def draw_layouts(rng: np.random.Generator, count: int, max_digits: int) -> dict[str, np.ndarray]:
    """Every random number of the image layout, drawn at once (the layout itself is arithmetic).

    Returns:
        boxes: (count, max_digits) side of each digit's 20x20 MNIST box, fraction of the height.
        gaps: (count, max_digits) gap after each digit, fraction of the height (last one unused).
        x: (count,) where the row of digits starts within the free width, 0..1.
        y: (count, max_digits) where each digit sits within the free height, 0..1.
    """
    return {
        "boxes": rng.uniform(*BOX_HEIGHT_RANGE, size=(count, max_digits)),
        "gaps": rng.uniform(*GAP_RANGE, size=(count, max_digits)),
        "x": rng.random(count),
        "y": rng.random((count, max_digits)),
    }


def compose_chunk(job: tuple[np.ndarray, dict[str, np.ndarray], int, int]) -> np.ndarray:
    """Draw one chunk of images; runs in a pool worker.

    Args:
        job: sources (n, max_digits) MNIST indices (-1 padding), layouts from ``draw_layouts``
            (n rows), image height, image width.

    Returns:
        (n, H, W) uint8, the digits left to right, each whole and inside the canvas.
    """
    sources, layout, height, width = job
    mnist_images, _ = load_mnist()
    images = np.zeros((sources.shape[0], height, width), dtype=np.uint8)
    for i, row in enumerate(sources):
        glyphs = [crop_to_ink(mnist_images[index]) for index in row[row >= 0]]
        draw_digits(images[i], glyphs, {k: v[i] for k, v in layout.items()})
    return images


def draw_digits(canvas: np.ndarray, glyphs: list[np.ndarray], layout: dict[str, np.ndarray]) -> np.ndarray:
    """Draw ink-cropped ``glyphs`` left to right into ``canvas`` (H, W) uint8, in place.

    Args:
        layout: one row of ``draw_layouts`` (boxes, gaps, y per digit; x).

    Returns:
        (len(glyphs), 2) int64: each digit's first column and width in pixels.
    """
    height, width = canvas.shape
    room = width - 2 * MARGIN
    count = len(glyphs)
    boxes = layout["boxes"][:count] * height  # px
    gaps = layout["gaps"][: count - 1] * height  # px
    glyph_h = np.array([g.shape[0] for g in glyphs]) * boxes / MNIST_BOX
    glyph_w = np.array([g.shape[1] for g in glyphs]) * boxes / MNIST_BOX
    shrink = min(1.0, room / (glyph_w.sum() + gaps.sum()))  # too wide: shrink all alike
    glyph_h = np.clip(np.floor(glyph_h * shrink), 1, height - 2 * MARGIN).astype(int)
    glyph_w = np.clip(np.floor(glyph_w * shrink), 1, room).astype(int)
    gaps_px = np.floor(gaps * shrink).astype(int)
    free_x = room - glyph_w.sum() - gaps_px.sum()
    x = MARGIN + int(layout["x"] * (free_x + 1))
    spans = np.zeros((count, 2), dtype=np.int64)
    for k, glyph in enumerate(glyphs):
        y = MARGIN + int(layout["y"][k] * (height - 2 * MARGIN - glyph_h[k] + 1))
        scaled = np.asarray(Image.fromarray(glyph).resize((int(glyph_w[k]), int(glyph_h[k])), Image.Resampling.BILINEAR))
        region = canvas[y : y + glyph_h[k], x : x + glyph_w[k]]
        np.maximum(region, scaled, out=region)  # overlapping strokes stay white, none erased
        spans[k] = x, glyph_w[k]
        x += glyph_w[k] + (gaps_px[k] if k < count - 1 else 0)
    return spans


# The reference handwriting of text -> image: every layout draw at the middle of its range, so a
# number's digits sit centred, at 0.75 of the height, 0.07 of the height apart.


# number's digits sit centred, at 0.75 of the height, 0.07 of the height apart.
REFERENCE_LAYOUT = {"boxes": 0.75, "gaps": 0.07, "x": 0.5, "y": 0.5}


def draw_reference(number: int, glyphs: np.ndarray, *, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``number`` in the reference handwriting: ``glyphs`` (from ``reference_glyphs``) placed by
    ``REFERENCE_LAYOUT``.

    Returns:
        (H, W) uint8 image, and (D, 2) int64 first column and width of each of its D digits.
    """
    digits = [int(c) for c in str(int(number))]
    layout = {k: np.full(len(digits), v) if k != "x" else v for k, v in REFERENCE_LAYOUT.items()}
    canvas = np.zeros((height, width), dtype=np.uint8)
    spans = draw_digits(canvas, [crop_to_ink(glyphs[d]) for d in digits], layout)
    return canvas, spans
