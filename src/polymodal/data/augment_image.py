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
  through ``affine_grid`` / ``grid_sample``; what comes in from outside the frame is black.
- Contrast: a gamma curve x ** gamma, then a linear stretch about the image mean, clamped to [0, 1].

Every draw comes from the ``numpy.random.Generator`` passed in (``augment.sample_rng``); each
transform draws from its own child generator, so turning one on or off leaves the others' draws.
"""

from __future__ import annotations

import dataclasses
import math

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
    """Grey dilation: each pixel becomes the max over its (kernel x kernel) neighbourhood. (C, H, W)."""
    return F.max_pool2d(image[None], kernel, stride=1, padding=kernel // 2)[0]


def erode(image: Tensor, kernel: int) -> Tensor:
    """Grey erosion: the min over the neighbourhood (a max-pool of the negated image). (C, H, W)."""
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
    _, height, width = image.shape
    forward = affine_matrix(rotation_degrees=rotation_degrees, shear_degrees=shear_degrees, scale=scale)
    inverse = np.linalg.inv(forward)  # output pixel -> input pixel
    # align_corners=False: normalised = centred pixel * (2 / size), per axis.
    to_norm = np.diag([2.0 / width, 2.0 / height])
    theta = np.zeros((2, 3))
    theta[:, :2] = to_norm @ inverse @ np.linalg.inv(to_norm)
    theta[:, 2] = -to_norm @ inverse @ np.asarray(translate, dtype=np.float64)
    theta_t = torch.as_tensor(theta, dtype=image.dtype, device=image.device)[None]  # (1, 2, 3)
    grid = F.affine_grid(theta_t, [1, *image.shape], align_corners=False)  # (1, H, W, 2)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def elastic_displacement(
    height: int, width: int, *, alpha: float, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Simard et al.'s field: (2, H, W) float64 displacements in pixels, (dx, dy)."""
    noise = rng.uniform(-1.0, 1.0, size=(2, height, width))
    from scipy.ndimage import gaussian_filter  # imported here: scipy.ndimage takes a second to load

    smooth = np.stack([gaussian_filter(axis, sigma) for axis in noise])  # (2, H, W)
    return alpha * smooth


def displace(image: Tensor, displacement: np.ndarray | Tensor) -> Tensor:
    """out[y, x] = image at (x + dx[y, x], y + dy[y, x]), bilinear, black outside. (C, H, W)."""
    _, height, width = image.shape
    disp = torch.as_tensor(displacement, dtype=image.dtype, device=image.device)  # (2, H, W)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=image.dtype, device=image.device),
        torch.arange(width, dtype=image.dtype, device=image.device),
        indexing="ij",
    )
    # Pixel index -> grid_sample's normalised coordinate (align_corners=False): (2i + 1) / size - 1.
    gx = (2.0 * (xs + disp[0]) + 1.0) / width - 1.0
    gy = (2.0 * (ys + disp[1]) + 1.0) / height - 1.0
    grid = torch.stack([gx, gy], dim=-1)[None]  # (1, H, W, 2), x first as grid_sample reads it
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


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
    child_seeds = rng.integers(0, 2**63, size=len(IMAGE_TRANSFORMS))
    rngs = {name: np.random.default_rng(int(s)) for name, s in zip(IMAGE_TRANSFORMS, child_seeds)}
    fires = {name: rngs[name].random() < getattr(settings, f"{name}_p") for name in IMAGE_TRANSFORMS}
    _, height, width = image.shape
    x = image
    if fires["stroke"]:
        x = dilate(x, settings.stroke_kernel) if rngs["stroke"].random() < 0.5 else erode(x, settings.stroke_kernel)
    if fires["elastic"]:
        r = rngs["elastic"]
        field = elastic_displacement(height, width, alpha=settings.elastic_alpha, sigma=settings.elastic_sigma, rng=r)
        x = displace(x, field)
    if fires["affine"]:
        r = rngs["affine"]
        shift = settings.translate_fraction * np.array([width, height]) * r.uniform(-1.0, 1.0, size=2)
        x = affine(
            x,
            rotation_degrees=float(r.uniform(-settings.rotation_degrees, settings.rotation_degrees)),
            shear_degrees=float(r.uniform(-settings.shear_degrees, settings.shear_degrees)),
            scale=float(r.uniform(*settings.scale_range)),
            translate=(float(shift[0]), float(shift[1])),
        )
    if fires["contrast"]:
        r = rngs["contrast"]
        log_gamma = r.uniform(math.log(settings.gamma_range[0]), math.log(settings.gamma_range[1]))
        x = adjust_contrast(x, gamma=math.exp(log_gamma), contrast=float(r.uniform(*settings.contrast_range)))
    return x.clamp(0.0, 1.0)
