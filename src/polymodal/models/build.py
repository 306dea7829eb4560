"""Assemble a model from a config: check every part spec first, then build the parts and wire them.

The assembler owns the wiring arguments (image size, vocabulary size, mel bins, widths); the config
owns the settings. ``check_model_config`` runs at config load, before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from polymodal.backbones import BACKBONES
from polymodal.config import Config
from polymodal.encoders import ENCODERS
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.any_to_any import TASKS, AnyToAnyModel, TextSpecials
from polymodal.models.clip import build_clip, check_clip_config
from polymodal.models.image_tokenizer import ImageTokenizerModel
from polymodal.projectors import PROJECTORS
from polymodal.tokenizers import IMAGE_TOKENIZERS

# The built-in data and the manifest loader give grayscale images.
IMAGE_CHANNELS = 1


@dataclasses.dataclass(frozen=True)
class DataShapes:
    """What the data side tells the assembler."""

    image_size: tuple[int, int]
    num_mels: int
    text: TextSpecials


def check_model_config(config: Config) -> None:
    """Validate part names, settings and tasks; raises ConfigError naming the key and valid choices."""
    model = config.model
    if model.architecture == "image_tokenizer":
        IMAGE_TOKENIZERS.check(model.image_tokenizer, where="model.image_tokenizer")
        return
    if model.architecture == "clip":
        check_clip_config(config)
        return
    for task in model.tasks:
        if task not in TASKS:
            raise ConfigError(f"model.tasks: unknown task {task!r}; valid: {', '.join(TASKS)}")
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
    for task in model.tasks:
        source, _ = TASKS[task]
        if source.value not in model.encoders:
            raise ConfigError(f"model.encoders.{source}: task {task} needs a {source} encoder; add one or drop the task")
    PROJECTORS.check(model.projector, where="model.projector")
    BACKBONES.check(model.backbone, where="model.backbone")


def build_model(config: Config, shapes: DataShapes) -> nn.Module:
    """Build every part named in ``config.model``: an ``AnyToAnyModel`` or an ``ImageTokenizerModel``."""
    check_model_config(config)
    model = config.model
    if model.architecture == "image_tokenizer":
        spec = model.image_tokenizer
        return ImageTokenizerModel(IMAGE_TOKENIZERS.build(spec, where="model.image_tokenizer"))
    if model.architecture == "clip":
        return build_clip(config, shapes)
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
    assembled = AnyToAnyModel(
        encoders=encoders, projectors=projectors, backbone=backbone, dim=model.dim, text=shapes.text, tasks=model.tasks
    )
    policy = getattr(backbone, "freeze", None)
    if policy is not None:  # a pretrained LM's freezing policy also covers the encoders
        from polymodal.backbones.hf_causal_lm import apply_freeze_policy

        apply_freeze_policy(assembled, policy)
    return assembled
