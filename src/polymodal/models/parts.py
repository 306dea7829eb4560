"""The parts every multimodal model here shares: per-modality encoders and projectors and one
backbone, checked and built from ``config.model``. ``build.py`` and ``clip.py`` wire them."""

from __future__ import annotations

import dataclasses

from torch import nn

from polymodal.backbones import BACKBONES
from polymodal.config import Config
from polymodal.encoders import ENCODERS
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.any_to_any import TextSpecials
from polymodal.projectors import PROJECTORS

# The built-in data and the manifest loader give grayscale images.
IMAGE_CHANNELS = 1


@dataclasses.dataclass(frozen=True)
class DataShapes:
    """What the data side tells the assembler."""

    image_size: tuple[int, int]
    num_mels: int
    text: TextSpecials
    num_audio_frames: int = 201  # log-mel frames of the longest clip (2 s at a 10 ms hop)


@dataclasses.dataclass(frozen=True)
class Parts:
    encoders: dict[Modality, nn.Module]
    projectors: dict[Modality, nn.Module]
    backbone: nn.Module


def check_parts(config: Config) -> None:
    """Each encoder is a known name of its modality's kind; projector and backbone specs are valid."""
    model = config.model
    for key, spec in model.encoders.items():
        try:
            modality = Modality.parse(key)
        except ValueError as exc:
            raise ConfigError(f"model.encoders.{key}: {exc}") from None
        cls, _ = ENCODERS.check(spec, where=f"model.encoders.{key}")
        if cls.modality is not modality:
            same = [n for n in ENCODERS.names() if ENCODERS.get(n).modality is modality]
            raise ConfigError(
                f"model.encoders.{key}.name: {spec['name']!r} encodes {cls.modality}, not {modality}; valid: {', '.join(same)}"
            )
    PROJECTORS.check(model.projector, where="model.projector")
    BACKBONES.check(model.backbone, where="model.backbone")


def build_parts(config: Config, shapes: DataShapes) -> Parts:
    """Build every encoder (with its modality's wiring), a projector per encoder, and the backbone."""
    model = config.model
    wiring = {
        Modality.IMAGE: (IMAGE_CHANNELS, shapes.image_size),
        Modality.TEXT: (shapes.text.vocab_size,),
        Modality.AUDIO: (shapes.num_mels,),
    }
    encoders: dict[Modality, nn.Module] = {}
    projectors: dict[Modality, nn.Module] = {}
    for key, spec in model.encoders.items():
        modality = Modality.parse(key)
        encoders[modality] = ENCODERS.build(spec, *wiring[modality], where=f"model.encoders.{key}")
        projectors[modality] = PROJECTORS.build(
            model.projector, encoders[modality].dim_out, model.dim, where="model.projector"
        )
    backbone = BACKBONES.build(model.backbone, model.dim, where="model.backbone")
    if hasattr(backbone, "init_weights"):  # pretrained backbones have none: their weights are loaded
        backbone.init_weights()
    return Parts(encoders, projectors, backbone)
