"""Image augmentation for white-ink-on-black (C, H, W) images in [0, 1]: stroke width, elastic
distortion, random affine, contrast, each with its own probability, in that order (the pen, the
paper's warp, the camera's pose, the exposure).

- Stroke width: grey-level dilation (thicker ink) or erosion (thinner) with a square kernel, as a
  max / min filter (``max_pool2d``). Dilation never darkens a pixel, erosion never brightens one.
- Elastic distortion (Simard et al. 2003, Best Practices for Convolutional Neural Networks Applied
  to Visual Document Analysis, ICDAR, Section 2): a displacement field of uniform(-1, 1) noise per
  pixel and axis, smoothed by a Gaussian of std sigma and scaled by alpha pixels; the image is
  resampled bilinearly at the displaced positions. Their MNIST setting: sigma 4, alpha 34.
- Affine: rotation, shear, scale and translation about the image centre, in pixel units (so a
  wide 32 x 96 image rotates without being sheared by its aspect ratio), resampled bilinearly
  through ``grid_sample``; what comes in from outside the frame is black.
- Contrast: a gamma curve x ** gamma, then a linear stretch about the image mean, clamped to [0, 1].

Every draw comes from the ``numpy.random.Generator`` passed in (``augment.sample_rng``); each
transform draws from its own child generator, so turning one on or off leaves the others' draws.

A batch is augmented at once (``augment_images``): the draws are made image by image, then each
transform resamples all the images it fires on in one call: 10.5 ms for a batch of 64 in the
`generation` preset's settings against 18.8 ms one image at a time, one thread
(``benchmarks/bench_image_augment.py``; collation runs inside the training step unless
``train.prefetch`` is set). Every op
works per image (element-wise grids, line-by-line smoothing, ``grid_sample`` image by image), so an
image comes out bit for bit as it would alone, whatever else is in its batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from polymodal.errors import ConfigError

IMAGE_TRANSFORMS = ("stroke", "elastic", "affine", "contrast")  # chain order


@dataclasses.dataclass(frozen=True)
class ImageAugmentSettings:
    """What happens to each training image. Every transform is off (probability 0) until set.

    Ranges are (low, high) and drawn uniformly (gamma: log-uniformly, so 1/g and g are as likely).
    """

    stroke_p: float = 0.0
    stroke_kernel: int = 3  # odd; 3 thickens or thins a stroke by about one pixel on each side
    elastic_p: float = 0.0
    elastic_alpha: float = 34.0  # pixels; Simard et al. 2003's MNIST setting
    elastic_sigma: float = 4.0  # pixels
    affine_p: float = 0.0
    rotation_degrees: float = 10.0  # |angle| up to this: handwriting's slant and a page's tilt
    shear_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_fraction: float = 0.05  # of the width (x) and height (y), either way
    contrast_p: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.4)
    contrast_range: tuple[float, float] = (0.7, 1.3)

    def __post_init__(self) -> None:
        where = "data.augment.image"
        for field in dataclasses.fields(self):
            if field.name.endswith("_p") and not 0.0 <= getattr(self, field.name) <= 1.0:
                raise ConfigError(f"{where}.{field.name}={getattr(self, field.name)}: a probability, in [0, 1]")
        for name in ("scale_range", "gamma_range", "contrast_range"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high:
                raise ConfigError(f"{where}.{name}={[low, high]}: need 0 < low <= high")
        if self.stroke_kernel < 1 or self.stroke_kernel % 2 == 0:
            raise ConfigError(f"{where}.stroke_kernel={self.stroke_kernel}: an odd size >= 1 (3, 5, ...)")
        if self.elastic_alpha < 0.0 or self.elastic_sigma <= 0.0:
            raise ConfigError(f"{where}: elastic_alpha >= 0 and elastic_sigma > 0 needed")

    @property
    def active(self) -> bool:
        return any(getattr(self, f"{name}_p") > 0.0 for name in IMAGE_TRANSFORMS)


def dilate(image: Tensor, kernel: int) -> Tensor:
    """Grey dilation: each pixel becomes the max over its (kernel x kernel) neighbourhood. (C, H, W)
    or (N, C, H, W)."""
    return F.max_pool2d(image, kernel, stride=1, padding=kernel // 2)


def erode(image: Tensor, kernel: int) -> Tensor:
    """Grey erosion: the min over the neighbourhood (a max-pool of the negated image). (C, H, W) or (N, C, H, W)."""
    return -dilate(-image, kernel)


def affine_matrix(*, rotation_degrees: float, shear_degrees: float, scale: float) -> np.ndarray:
    """(2, 2) forward map in centred pixel coordinates (x right, y down): rotate . shear . scale."""
    theta, phi = math.radians(rotation_degrees), math.radians(shear_degrees)
    rotate = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    shear = np.array([[1.0, math.tan(phi)], [0.0, 1.0]])
    return rotate @ shear @ (scale * np.eye(2))


def affine(
    image: Tensor,
    *,
    rotation_degrees: float = 0.0,
    shear_degrees: float = 0.0,
    scale: float = 1.0,
    translate: tuple[float, float] = (0.0, 0.0),
) -> Tensor:
    """Move the image content by ``p -> A p + t`` about its centre; outside the frame is black.

    Args:
        image: (C, H, W).
        rotation_degrees, shear_degrees, scale: build A (``affine_matrix``).
        translate: t = (x, y) in pixels.

    Returns:
        (C, H, W), bilinear.
    """
    theta = affine_theta(image.shape[1:], rotation_degrees, shear_degrees, scale, translate)
    return warp_affine(image[None], theta[None])[0]


def affine_theta(
    size: tuple[int, int] | torch.Size, rotation_degrees: float, shear_degrees: float, scale: float, translate: tuple[float, float]
) -> np.ndarray:
    """(2, 3) float64: output -> input in ``grid_sample``'s normalised coordinates, for an image of
    ``size`` (H, W) moved as ``affine`` moves it."""
    height, width = size
    (a, b), (c, d) = affine_matrix(rotation_degrees=rotation_degrees, shear_degrees=shear_degrees, scale=scale)
    inverse = np.array([[d, -b], [-c, a]]) / (a * d - b * c)  # output pixel -> input pixel
    # align_corners=False: normalised = centred pixel * (2 / size), per axis.
    to_norm, from_norm = np.diag([2.0 / width, 2.0 / height]), np.diag([width / 2.0, height / 2.0])
    theta = np.zeros((2, 3))
    theta[:, :2] = to_norm @ inverse @ from_norm
    theta[:, 2] = -to_norm @ inverse @ np.asarray(translate, dtype=np.float64)
    return theta


def warp_affine(images: Tensor, theta: np.ndarray | Tensor) -> Tensor:
    """(N, C, H, W) images, each resampled through its own (2, 3) map of ``theta`` (N, 2, 3)
    (``affine_theta``), bilinear, black outside. The grid is made element by element (not by
    ``affine_grid``'s matrix product), so an image's result does not depend on the others."""
    _, _, height, width = images.shape
    t = torch.as_tensor(theta, dtype=images.dtype, device=images.device)[:, :, :, None, None]  # (N, 2, 3, 1, 1)
    # Pixel centres in normalised coordinates (align_corners=False): (2i + 1) / size - 1.
    x = ((2.0 * torch.arange(width, dtype=images.dtype, device=images.device) + 1.0) / width - 1.0)[None, :]  # (1, W)
    y = ((2.0 * torch.arange(height, dtype=images.dtype, device=images.device) + 1.0) / height - 1.0)[:, None]  # (H, 1)
    grid = t[:, :, 0] * x + t[:, :, 1] * y + t[:, :, 2]  # (N, 2, H, W): input x, input y
    return F.grid_sample(images, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic_displacement(
    height: int, width: int, *, alpha: float, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Simard et al.'s field: (2, H, W) float64 displacements in pixels, (dx, dy)."""
    return smooth_fields(rng.uniform(-1.0, 1.0, size=(1, 2, height, width)), alpha=alpha, sigma=sigma)[0]


def smooth_fields(noise: np.ndarray, *, alpha: float, sigma: float) -> np.ndarray:
    """(N, 2, H, W) uniform noise -> displacement fields: each (H, W) plane smoothed by a Gaussian of
    std ``sigma`` (scipy's, reflecting at the edges) and scaled by ``alpha``. The filter runs along
    H, then W, line by line, so a plane's field is the same whatever else is in the stack."""
    from scipy.ndimage import gaussian_filter  # imported here: scipy.ndimage takes a second to load

    return alpha * gaussian_filter(noise, (0.0, 0.0, sigma, sigma))


def displace(image: Tensor, displacement: np.ndarray | Tensor) -> Tensor:
    """out[y, x] = image at (x + dx[y, x], y + dy[y, x]), bilinear, black outside. (C, H, W)."""
    return displace_many(image[None], torch.as_tensor(displacement)[None])[0]


def displace_many(images: Tensor, displacement: np.ndarray | Tensor) -> Tensor:
    """``displace`` for (N, C, H, W) images and their (N, 2, H, W) fields, in one resampling."""
    _, _, height, width = images.shape
    disp = torch.as_tensor(displacement, dtype=images.dtype, device=images.device)  # (N, 2, H, W)
    xs = torch.arange(width, dtype=images.dtype, device=images.device)[None, :]  # (1, W)
    ys = torch.arange(height, dtype=images.dtype, device=images.device)[:, None]  # (H, 1)
    # Pixel index -> grid_sample's normalised coordinate (align_corners=False): (2i + 1) / size - 1.
    gx = (2.0 * (xs + disp[:, 0]) + 1.0) / width - 1.0
    gy = (2.0 * (ys + disp[:, 1]) + 1.0) / height - 1.0
    grid = torch.stack([gx, gy], dim=-1)  # (N, H, W, 2), x first as grid_sample reads it
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def adjust_contrast(image: Tensor, *, gamma: float, contrast: float) -> Tensor:
    """x ** gamma, then (x - mean) * contrast + mean, clamped to [0, 1]. (C, H, W)."""
    curved = image.clamp(0.0, 1.0) ** gamma
    mean = curved.mean()
    return ((curved - mean) * contrast + mean).clamp(0.0, 1.0)


def augment_image(image: Tensor, settings: ImageAugmentSettings, rng: np.random.Generator) -> Tensor:
    """Run the image chain (stroke, elastic, affine, contrast) on one image.

    Args:
        image: (C, H, W) float in [0, 1], white ink on black.
        settings: which transforms fire, with what probability and ranges.
        rng: this item's generator (``augment.sample_rng(..., stream="image")``).

    Returns:
        (C, H, W), same dtype, in [0, 1].
    """
    return augment_images([image], settings, [rng])[0]


@dataclasses.dataclass
class _Draws:
    """One image's draws for the chain; None: the transform does not fire."""

    dilate: bool | None = None
    noise: np.ndarray | None = None  # (2, H, W) elastic noise, before smoothing
    theta: np.ndarray | None = None  # (2, 3) affine map (``affine_theta``)
    contrast: tuple[float, float] | None = None  # (gamma, contrast)


def _draw(settings: ImageAugmentSettings, rng: np.random.Generator, height: int, width: int) -> _Draws:
    child_seeds = rng.integers(0, 2**63, size=len(IMAGE_TRANSFORMS))
    rngs = {name: np.random.default_rng(int(s)) for name, s in zip(IMAGE_TRANSFORMS, child_seeds)}
    fires = {name: rngs[name].random() < getattr(settings, f"{name}_p") for name in IMAGE_TRANSFORMS}
    draws = _Draws()
    if fires["stroke"]:
        draws.dilate = bool(rngs["stroke"].random() < 0.5)
    if fires["elastic"]:
        draws.noise = rngs["elastic"].uniform(-1.0, 1.0, size=(2, height, width))
    if fires["affine"]:
        r = rngs["affine"]
        shift = settings.translate_fraction * np.array([width, height]) * r.uniform(-1.0, 1.0, size=2)
        rotation = float(r.uniform(-settings.rotation_degrees, settings.rotation_degrees))
        shear = float(r.uniform(-settings.shear_degrees, settings.shear_degrees))
        draws.theta = affine_theta((height, width), rotation, shear, float(r.uniform(*settings.scale_range)), tuple(shift))
    if fires["contrast"]:
        r = rngs["contrast"]
        log_gamma = r.uniform(math.log(settings.gamma_range[0]), math.log(settings.gamma_range[1]))
        draws.contrast = (math.exp(log_gamma), float(r.uniform(*settings.contrast_range)))
    return draws


def augment_images(
    images: Sequence[Tensor], settings: ImageAugmentSettings, rngs: Sequence[np.random.Generator]
) -> list[Tensor]:
    """``augment_image`` on many images at once: each image's draws come from its own generator,
    and images of one shape and dtype are warped together (one resampling per transform, not one
    per image). Every image comes out as it would alone (``tests/data/test_augment_image.py``).

    Args:
        images: (C, H, W) floats in [0, 1].
        settings: the chain.
        rngs: one generator per image.

    Returns:
        The augmented images, in order.
    """
    if len(images) != len(rngs):
        raise ValueError(f"need one generator per image, got {len(images)} images and {len(rngs)} generators")
    draws = [_draw(settings, rng, *image.shape[1:]) for image, rng in zip(images, rngs)]
    out = list(images)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault((tuple(image.shape), image.dtype, image.device), []).append(i)
    for members in groups.values():
        for dilated in (True, False):
            stroke = dilate if dilated else erode
            _warp(out, [i for i in members if draws[i].dilate is dilated], lambda stack: stroke(stack, settings.stroke_kernel))
        elastic = [i for i in members if draws[i].noise is not None]
        if elastic:
            noise = np.stack([draws[i].noise for i in elastic])
            fields = smooth_fields(noise, alpha=settings.elastic_alpha, sigma=settings.elastic_sigma)
            _warp(out, elastic, lambda stack: displace_many(stack, fields))
        moved = [i for i in members if draws[i].theta is not None]
        _warp(out, moved, lambda stack: warp_affine(stack, np.stack([draws[i].theta for i in moved])))
    for i, d in enumerate(draws):
        if d.contrast is not None:  # one image at a time: its mean is then reduced as it would be alone
            out[i] = adjust_contrast(out[i], gamma=d.contrast[0], contrast=d.contrast[1])
    return [x.clamp(0.0, 1.0) for x in out]


def _warp(out: list[Tensor], chosen: list[int], transform) -> None:
    """Replace the ``chosen`` images of ``out`` by ``transform`` of their stack (N, C, H, W); none chosen: nothing."""
    if chosen:
        for i, x in zip(chosen, transform(torch.stack([out[i] for i in chosen]))):
            out[i] = x
