"""Assemble a model from a config: check every part spec first, then build the parts and wire them.

The assembler owns the wiring arguments (image size, vocabulary size, mel bins, widths); the config
owns the settings. ``check_model_config`` runs at config load, before any tensor is allocated.
"""

from __future__ import annotations

from torch import nn

from polymodal.config import Config
from polymodal.errors import ConfigError
from polymodal.models.any_to_any import TASKS, AnyToAnyModel, TextSpecials
from polymodal.models.clip import build_clip, check_clip_config
from polymodal.models.image_tokenizer import ImageTokenizerModel
from polymodal.models.parts import DataShapes, build_parts, check_parts
from polymodal.tokenizers import IMAGE_TOKENIZERS

__all__ = ["DataShapes", "TextSpecials", "build_model", "check_model_config"]


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
    check_parts(config)
    for task in model.tasks:
        source, _ = TASKS[task]
        if source.value not in model.encoders:
            raise ConfigError(f"model.encoders.{source}: task {task} needs a {source} encoder; add one or drop the task")


def build_model(config: Config, shapes: DataShapes) -> nn.Module:
    """Build every part named in ``config.model``: an any-to-any, CLIP or image-tokenizer model."""
    check_model_config(config)
    model = config.model
    if model.architecture == "image_tokenizer":
        spec = model.image_tokenizer
        return ImageTokenizerModel(IMAGE_TOKENIZERS.build(spec, where="model.image_tokenizer"))
    if model.architecture == "clip":
        return build_clip(config, shapes)
    parts = build_parts(config, shapes)
    assembled = AnyToAnyModel(
        encoders=parts.encoders,
        projectors=parts.projectors,
        backbone=parts.backbone,
        dim=model.dim,
        text=shapes.text,
        tasks=model.tasks,
    )
    policy = getattr(parts.backbone, "freeze", None)
    if policy is not None:  # a pretrained LM's freezing policy also covers the encoders
        from polymodal.backbones.hf_causal_lm import apply_freeze_policy

        apply_freeze_policy(assembled, policy)
    return assembled
