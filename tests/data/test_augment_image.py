"""Image augmentation: the affine warp and the elastic displacement against scipy.ndimage's
resampling of the same maps, identities (identity affine, zero-strength elastic, gamma 1 and
contrast 1), hand cases (a whole-pixel shift, a quarter turn), dilation and erosion against
scipy's grey morphology and their order properties, and the chain's determinism and range."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from polymodal.data.augment import sample_rng
from polymodal.data.augment_image import (
    ImageAugmentSettings,
    adjust_contrast,
    affine,
    affine_matrix,
    augment_image,
    augment_images,
    dilate,
    displace,
    elastic_displacement,
    erode,
)
from polymodal.errors import ConfigError

ALL_ON = ImageAugmentSettings(stroke_p=1.0, elastic_p=1.0, affine_p=1.0, contrast_p=1.0)


def _digits(height: int = 32, width: int = 96, channels: int = 1) -> torch.Tensor:
    """White strokes on black, with grey anti-aliased edges."""
    image = torch.zeros(channels, height, width)
    image[:, 6:26, 10:13] = 1.0
    image[:, 6:9, 30:60] = 0.8
    image[:, 20:23, 40:80] = 0.6
    return torch.from_numpy(ndimage.gaussian_filter(image.numpy(), (0, 0.7, 0.7)).astype(np.float32))


def _scipy_affine(image: np.ndarray, forward: np.ndarray, translate: np.ndarray) -> np.ndarray:
    """The same map through scipy: output (row, col) -> input (row, col), about the pixel centre."""
    _, height, width = image.shape
    centre = np.array([(height - 1) / 2, (width - 1) / 2])
    swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
    inverse = swap @ np.linalg.inv(forward) @ swap
    offset = centre - inverse @ (centre + swap @ translate)
    return np.stack(
        [ndimage.affine_transform(c, inverse, offset=offset, order=1, mode="grid-constant", cval=0.0) for c in image]
    )


def test_identity_affine_is_identity():
    image = _digits(channels=3)
    torch.testing.assert_close(affine(image), image, atol=1e-6, rtol=0)


@pytest.mark.parametrize("params", [(12.0, -7.0, 1.08, (2.5, -1.25)), (-25.0, 15.0, 0.85, (-4.0, 3.0))])
def test_affine_equals_scipy_affine_transform(params):
    rotation, shear, scale, translate = params
    image = _digits().double()
    ours = affine(image, rotation_degrees=rotation, shear_degrees=shear, scale=scale, translate=translate)
    forward = affine_matrix(rotation_degrees=rotation, shear_degrees=shear, scale=scale)
    reference = _scipy_affine(image.numpy(), forward, np.asarray(translate))
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-9)


def test_whole_pixel_shift_and_quarter_turn_by_hand():
    image = _digits()
    shifted = affine(image, translate=(3.0, -2.0))  # 3 px right, 2 px up
    expected = torch.zeros_like(image)
    expected[:, :-2, 3:] = image[:, 2:, :-3]
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)
    square = _digits(32, 32)
    # +90 degrees with y pointing down turns the content clockwise on screen.
    quarter = torch.rot90(square, k=-1, dims=(1, 2))
    torch.testing.assert_close(affine(square, rotation_degrees=90.0), quarter, atol=1e-5, rtol=0)


def test_zero_strength_elastic_is_identity_and_warp_equals_scipy_map_coordinates():
    image = _digits().double()
    still = elastic_displacement(32, 96, alpha=0.0, sigma=4.0, rng=np.random.default_rng(0))
    assert not still.any()
    torch.testing.assert_close(displace(image, still), image, atol=1e-9, rtol=0)

    field = elastic_displacement(32, 96, alpha=34.0, sigma=4.0, rng=np.random.default_rng(1))
    assert field.shape == (2, 32, 96) and 0.3 < np.abs(field).mean() < 5.0  # a few pixels, smooth
    rows, cols = np.mgrid[0:32, 0:96].astype(np.float64)
    coords = np.stack([rows + field[1], cols + field[0]])
    reference = ndimage.map_coordinates(image[0].numpy(), coords, order=1, mode="grid-constant", cval=0.0)
    np.testing.assert_allclose(displace(image, field)[0].numpy(), reference, atol=1e-9)


@pytest.mark.parametrize("kernel", [3, 5])
def test_dilation_and_erosion_equal_scipy_grey_morphology_and_are_ordered(kernel):
    torch.manual_seed(0)
    image = torch.rand(2, 20, 30)
    thick, thin = dilate(image, kernel), erode(image, kernel)
    size = (1, kernel, kernel)
    np.testing.assert_array_equal(thick.numpy(), ndimage.grey_dilation(image.numpy(), size=size, mode="nearest"))
    np.testing.assert_array_equal(thin.numpy(), ndimage.grey_erosion(image.numpy(), size=size, mode="nearest"))
    assert torch.all(thick >= image) and torch.all(thin <= image)


def test_contrast_identity_range_and_order():
    image = _digits()
    torch.testing.assert_close(adjust_contrast(image, gamma=1.0, contrast=1.0), image, atol=1e-6, rtol=0)
    out = adjust_contrast(image, gamma=0.6, contrast=1.3)
    assert out.min() >= 0 and out.max() <= 1
    flat_in, flat_out = image.flatten(), out.flatten()
    order = torch.argsort(flat_in)
    assert torch.all(torch.diff(flat_out[order]) >= -1e-7)  # a monotone curve: brighter stays brighter


def test_the_chain_is_deterministic_per_key_keeps_shape_dtype_and_range():
    image = _digits(channels=3)
    a = augment_image(image, ALL_ON, sample_rng(5, 1, 40, stream="image"))
    b = augment_image(image, ALL_ON, sample_rng(5, 1, 40, stream="image"))
    c = augment_image(image, ALL_ON, sample_rng(5, 1, 41, stream="image"))
    d = augment_image(image, ALL_ON, sample_rng(5, 2, 40, stream="image"))  # next epoch: drawn afresh
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    for out in (a, c, d):
        assert out.shape == image.shape and out.dtype == image.dtype
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(augment_image(image, ImageAugmentSettings(), sample_rng(5, 1, 40, stream="image")), image)


def test_turning_a_transform_on_leaves_the_others_draws_alone():
    image = _digits()
    contrast_only = ImageAugmentSettings(contrast_p=1.0)
    with_identity_stroke = ImageAugmentSettings(contrast_p=1.0, stroke_p=1.0, stroke_kernel=1)  # a 1x1 max: no-op
    a = augment_image(image, contrast_only, sample_rng(0, 0, 9, stream="image"))
    b = augment_image(image, with_identity_stroke, sample_rng(0, 0, 9, stream="image"))
    assert torch.equal(a, b) and not torch.equal(a, image)


def test_a_batch_is_augmented_image_by_image_bit_for_bit():
    """augment_images warps a batch together; each image equals augment_image on it alone, across
    shapes, channel counts and dtypes in one batch, whatever else fires beside it."""
    torch.manual_seed(3)
    half = ImageAugmentSettings(stroke_p=0.5, elastic_p=0.5, affine_p=0.5, contrast_p=0.5)
    images = [_digits() * torch.rand(()) for _ in range(20)] + [_digits(24, 40, channels=3), _digits().double(), _digits()]
    for settings in (ALL_ON, half):
        rngs = lambda: [sample_rng(1, 0, i, stream="image") for i in range(len(images))]  # noqa: E731
        together = augment_images(images, settings, rngs())
        alone = [augment_image(image, settings, rng) for image, rng in zip(images, rngs())]
        for a, b, image in zip(together, alone, images):
            assert torch.equal(a, b) and a.shape == image.shape and a.dtype == image.dtype
        reordered = augment_images(images[::-1], settings, rngs()[::-1])[::-1]
        assert all(torch.equal(a, b) for a, b in zip(together, reordered))
    with pytest.raises(ValueError, match="one generator per image"):
        augment_images(images, ALL_ON, [])


def test_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match=r"data\.augment\.image\.affine_p"):
        ImageAugmentSettings(affine_p=-0.1)
    with pytest.raises(ConfigError, match="stroke_kernel.*odd"):
        ImageAugmentSettings(stroke_kernel=4)
    with pytest.raises(ConfigError, match="gamma_range"):
        ImageAugmentSettings(gamma_range=(0.0, 1.0))
    assert math.isclose(ImageAugmentSettings().elastic_alpha, 34.0) and not ImageAugmentSettings().active
