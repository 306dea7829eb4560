"""A pretrained Hugging Face image encoder (ViT, DINOv2, CLIP or SigLIP vision tower) loaded from a
local folder, with the model's own image preprocessing done in torch.

The folder is a ``save_pretrained`` output holding the model and its image processor
(``preprocessor_config.json``). From a full CLIP / SigLIP checkpoint only the vision tower is
kept. Our images arrive normalised to [-1, 1] by ``data/image.py`` (1 grey or 3 RGB channels);
``preprocess`` undoes that and then does what the folder's image processor does, batched, on the
images' device: grey -> RGB by repeating the channel, resize (bilinear or bicubic with
antialiasing, which is Pillow's filter), centre crop where the processor crops, then the
processor's rescale and mean / std. With ``fit="pad"`` (the default) each image is first padded
with black to a centred square, so a wide 32 x 96 number keeps its aspect ratio and every digit
(the processors' resize squashes it, and CLIP's / DINOv2's centre crop would cut off its ends);
``fit="processor"`` follows the processor alone.

Tokens are one layer's hidden states (``layer``, see ``hf_trunk``), with or without the leading
CLS token (and DINOv2's register tokens); the pooling heads (ViT's pooler, CLIP's post-norm of the
pooled token, SigLIP's attention-pooling head) are dropped.

References: Dosovitskiy et al. 2020, ViT, arXiv:2010.11929; Oquab et al. 2023, DINOv2,
arXiv:2304.07193 (and registers: Darcet et al. 2023, arXiv:2309.16588); Radford et al. 2021,
CLIP, arXiv:2103.00020; Zhai et al. 2023, SigLIP, arXiv:2303.15343.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.backbones.hf_common import import_transformers, load_pretrained, resolve_local_folder
from polymodal.data.image import denormalize_images
from polymodal.encoders import ENCODERS
from polymodal.encoders.hf_trunk import (
    TrunkLayout,
    encoder_apply_freeze,
    encoder_train,
    prepare_trunk,
    read_preprocessor_config,
)
from polymodal.encoders.output import EncoderIntermediates, EncoderOutput
from polymodal.errors import ConfigError
from polymodal.modality import Modality

logger = logging.getLogger(__name__)

WHERE = "model.encoders.image"
FITS = ("pad", "processor")
PIXEL_MAX = 255.0  # processors' rescale_factor (1/255) maps 8-bit pixels to [0, 1]
RESAMPLE_MODES = {2: "bilinear", 3: "bicubic"}  # Pillow's filter codes, as processors store them
# Per vision tower (config.model_type): its layout, and whether it puts a CLS token first.
FAMILIES = {
    "vit": (TrunkLayout(final_norm="layernorm", unused=("pooler",)), 1),
    "dinov2": (TrunkLayout(final_norm="layernorm"), 1),
    "dinov2_with_registers": (TrunkLayout(final_norm="layernorm"), 1),
    # CLIP normalises only the pooled CLS token (post_layernorm); its tokens are the raw last block.
    "clip_vision_model": (TrunkLayout(unused=("post_layernorm",)), 1),
    "siglip_vision_model": (TrunkLayout(final_norm="post_layernorm", unused=("head",)), 0),
}


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """The processor's steps. ``size``: (H, W), or (S, None) for "shortest edge to S"."""

    size: tuple[int, int | None]
    crop: tuple[int, int] | None
    mode: str
    scale: float  # from [0, 1] to the model's pixel scale (rescale_factor * 255, or 255)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: dict) -> ImageProcessing:
        size = config.get("size")
        crop_size = config.get("crop_size") if config.get("do_center_crop", False) else None
        if isinstance(size, int):  # old processors: an int is the shortest edge when they crop, else a square
            size = {"shortest_edge": size} if crop_size else {"height": size, "width": size}
        if isinstance(crop_size, int):
            crop_size = {"height": crop_size, "width": crop_size}
        if not config.get("do_resize", True) or not isinstance(size, dict):
            raise ConfigError(f"{WHERE}: the image processor does not resize to a fixed size ({size!r}); not supported")
        if "shortest_edge" in size:
            target = (int(size["shortest_edge"]), None)
        else:
            target = (int(size["height"]), int(size["width"]))
        resample = config.get("resample", 2)
        if resample not in RESAMPLE_MODES:
            raise ConfigError(f"{WHERE}: image processor resample={resample!r}; supported: 2 (bilinear), 3 (bicubic)")
        scale = PIXEL_MAX * (config.get("rescale_factor", 1.0 / PIXEL_MAX) if config.get("do_rescale", True) else 1.0)
        normalize = config.get("do_normalize", True)
        mean = tuple(config.get("image_mean", (0.0,) * 3)) if normalize else (0.0,) * 3
        std = tuple(config.get("image_std", (1.0,) * 3)) if normalize else (1.0,) * 3
        crop = None if crop_size is None else (int(crop_size["height"]), int(crop_size["width"]))
        return cls(target, crop, RESAMPLE_MODES[resample], scale, mean, std)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape after resizing, as the processors compute it (the long side truncated)."""
        target, other = self.size
        if other is not None:
            return target, other
        if height <= width:
            return target, int(target * width / height)
        return int(target * height / width), target


def pad_to_square(images: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, S, S), S = max(H, W), the image centred on zeros (black)."""
    height, width = images.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return F.pad(images, (left, side - width - left, top, side - height - top))


def center_crop(images: Tensor, height: int, width: int) -> Tensor:
    """The processors' centre crop, padding with zeros where the image is smaller. (B, C, h, w)."""
    in_h, in_w = images.shape[-2:]
    pad_h, pad_w = max(height - in_h, 0), max(width - in_w, 0)
    images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    in_h, in_w = images.shape[-2:]
    top, left = (in_h - height) // 2, (in_w - width) // 2
    return images[..., top : top + height, left : left + width]


@ENCODERS.register("hf_image")
class HFImageEncoder(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> one layer's tokens (B, N, hidden size) of a pretrained tower.

    Args:
        in_channels: channels of the library's images (1 grey or 3 RGB).
        image_size: (H, W) of the library's images; recorded, the processor decides the model's size.
        path: local folder with the model and its ``preprocessor_config.json``. Nothing is downloaded.
        freeze: ``frozen``, ``last_n`` or ``full`` (see ``hf_trunk``).
        last_n: blocks that train under ``freeze=last_n``.
        layer: whose hidden states the tokens are: -1 the last layer (with the model's final norm),
            k or -k a block's raw output (``hidden_states[k]`` of the model).
        cls_token: keep the CLS token (and DINOv2's register tokens) in front of the patch tokens.
        fit: ``pad`` (pad to a square with black, then the processor) or ``processor``.
    """

    modality = Modality.IMAGE

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        *,
        path: str,
        freeze: str = "frozen",
        last_n: int = 1,
        layer: int = -1,
        cls_token: bool = True,
        fit: str = "pad",
    ) -> None:
        super().__init__()
        if fit not in FITS:
            raise ConfigError(f"{WHERE}.fit: {fit!r}; valid: {', '.join(FITS)}")
        if in_channels not in (1, 3):
            raise ConfigError(f"{WHERE}: images with {in_channels} channels; hf_image reads 1 (grey) or 3 (RGB)")
        folder = resolve_local_folder(path, what=f"{WHERE}.path")
        self.processing = ImageProcessing.from_config(read_preprocessor_config(folder, WHERE))
        model = load_pretrained(import_transformers().AutoModel, folder)
        while hasattr(model, "vision_model"):  # CLIP / SigLIP: keep the vision tower only
            model = model.vision_model
        model_type = model.config.model_type
        if model_type not in FAMILIES:
            raise ConfigError(f"{WHERE}: {folder} holds a {model_type!r} model; hf_image reads {', '.join(FAMILIES)}")
        layout, has_cls = FAMILIES[model_type]
        if in_channels not in (1, model.config.num_channels):
            raise ConfigError(f"{WHERE}: {in_channels}-channel images for a {model.config.num_channels}-channel model")
        self.model = model
        self.trunk = prepare_trunk(model, layout, layer=layer, freeze=freeze, last_n=last_n, where=WHERE)
        self.num_prefix = has_cls + getattr(model.config, "num_register_tokens", 0)
        self.model_channels = model.config.num_channels
        self.in_channels, self.image_size = in_channels, tuple(image_size)
        self.freeze, self.layer, self.cls_token, self.fit = freeze, layer, cls_token, fit
        self.path = str(folder)
        self.dim_out = model.config.hidden_size
        channels = self.model_channels
        # Non-persistent: they come from the folder's processor, not from training.
        self.register_buffer("mean", torch.tensor(self.processing.mean[:channels]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.processing.std[:channels]).view(1, -1, 1, 1), persistent=False)
        self._interpolate = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        self.train(self.training)
        logger.info("loaded %s from %s (layer %d, %s)", type(model).__name__, folder, self.trunk.num_layers, freeze)

    train = encoder_train  # frozen parts stay in eval mode
    apply_freeze = encoder_apply_freeze

    def cache_identity(self) -> str:
        """Everything that decides this encoder's output, for ``feature_cache`` keys."""
        return f"hf_image|{self.path}|layer={self.layer}|cls={self.cls_token}|fit={self.fit}|in={self.in_channels}"

    def resize(self, pixels: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> the processor's size, as Pillow resizes: width first, then height,
        each pass clamped to [0, 1] (Pillow resizes 8-bit images, which saturate where bicubic
        overshoots). Antialiased, so shrinking widens the filter as Pillow does."""
        height, width = self.processing.resized_shape(*pixels.shape[-2:])
        settings = dict(mode=self.processing.mode, align_corners=False, antialias=True)
        if pixels.shape[-1] != width:
            pixels = F.interpolate(pixels, size=(pixels.shape[-2], width), **settings).clamp(0.0, 1.0)
        if pixels.shape[-2] != height:
            pixels = F.interpolate(pixels, size=(height, width), **settings).clamp(0.0, 1.0)
        return pixels

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> the model's pixel values (B, model channels, h, w), float32."""
        pixels = denormalize_images(images.float()).clamp(0.0, 1.0)  # [0, 1], as the processor's input
        if pixels.shape[1] != self.model_channels:
            pixels = pixels.expand(-1, self.model_channels, -1, -1)  # grey -> RGB: the same value in each channel
        if self.fit == "pad":
            pixels = pad_to_square(pixels)
        pixels = self.resize(pixels)
        if self.processing.crop is not None:
            pixels = center_crop(pixels, *self.processing.crop)
        return (pixels * self.processing.scale - self.mean) / self.std

    def forward_intermediates(self, images: Tensor, mask: Tensor | None = None) -> EncoderIntermediates:
        """Preprocess, run the tower, keep every kept block's output.

        Args:
            images: (B, C, H, W) normalised to [-1, 1].
            mask: accepted like every encoder's and unused (images have no padding).

        Returns:
            EncoderIntermediates: ``output`` as ``forward``; ``hidden``: one (B, N, D) per kept
            block, first to last (Hugging Face's ``hidden_states[1:]``), prefix tokens dropped
            as in the output.
        """
        out = self._run(images, with_hidden=True)
        skip = 0 if self.cls_token else self.num_prefix
        hidden = [h[:, skip:] for h in out.hidden_states[1:]]
        return EncoderIntermediates(EncoderOutput(out.last_hidden_state[:, skip:]), hidden)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """(B, C, H, W) in [-1, 1] -> tokens (B, N, hidden size); every token is real (``mask`` unused)."""
        skip = 0 if self.cls_token else self.num_prefix
        return EncoderOutput(self._run(images, with_hidden=False).last_hidden_state[:, skip:])

    def _run(self, images: Tensor, *, with_hidden: bool):
        if images.shape[1] != self.in_channels:
            raise ValueError(f"hf_image was built for {self.in_channels}-channel images, got {tuple(images.shape)}")
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        pixels = self.preprocess(images)
        return self.model(pixel_values=pixels, output_hidden_states=with_hidden, return_dict=True, **kwargs)
