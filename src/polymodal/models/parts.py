"""The trunk every multimodal model here shares, built from ``config.model``: per-modality encoders
and projectors (a ``ModalityEncoder``) and one backbone. ``architectures.py`` wires the rest."""

from __future__ import annotations

from torch import nn

from polymodal.backbones import BACKBONES
from polymodal.config import Config
from polymodal.encoders import ENCODERS
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.encoding import ModalityEncoder
from polymodal.models.shapes import DataShapes
from polymodal.projectors import PROJECTORS


def encoder_wiring(modality: Modality, shapes: DataShapes) -> tuple:
    """The positional wiring an encoder of ``modality`` is built with."""
    if modality is Modality.IMAGE:
        return (shapes.image_channels, shapes.image_size)
    if modality is Modality.TEXT:
        return (shapes.text.vocab_size,)
    return (shapes.num_mels,)


def build_trunk(config: Config, shapes: DataShapes) -> tuple[ModalityEncoder, nn.Module]:
    """Every encoder (each a known part of its modality), a projector per encoder, and the backbone."""
    model = config.model
    encoders: dict[Modality, nn.Module] = {}
    projectors: dict[Modality, nn.Module] = {}
    for key, spec in model.encoders.items():
        where = f"model.encoders.{key}"
        try:
            modality = Modality.parse(key)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        cls, _ = ENCODERS.check(spec, where=where)
        if cls.modality is not modality:
            same = [n for n in ENCODERS.names() if ENCODERS.get(n).modality is modality]
            raise ConfigError(f"{where}.name: {spec['name']!r} encodes {cls.modality}, not {modality}; valid: {', '.join(same)}")
        encoders[modality] = ENCODERS.build(spec, *encoder_wiring(modality, shapes), where=where)
        projectors[modality] = PROJECTORS.build(model.projector, encoders[modality].dim_out, model.dim, where="model.projector")
    backbone = BACKBONES.build(model.backbone, model.dim, where="model.backbone")
    if hasattr(backbone, "init_weights"):  # pretrained backbones have none: their weights are loaded
        backbone.init_weights()
    return ModalityEncoder(encoders, projectors, model.dim), backbone
