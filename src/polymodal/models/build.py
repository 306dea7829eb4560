"""Assemble a model from a config: check every part spec first, then build the parts and wire them.

The assembler owns the wiring arguments (image size, vocabulary size, mel bins, widths); the config
owns the settings. ``check_model_config`` runs at config load, before any tensor is allocated.
"""

from __future__ import annotations

from torch import nn

from polymodal.config import Config
from polymodal.errors import ConfigError
from polymodal.models.any_to_any import (
    CONTRASTIVE,
    TASK_NAMES,
    TASKS,
    AnyToAnyModel,
    AudioTargets,
    TextSpecials,
    check_task_fractions,
)
from polymodal.models.clip import build_clip, check_clip_config
from polymodal.models.image_tokenizer import ImageTokenizerModel
from polymodal.models.parts import DataShapes, build_parts, check_parts
from polymodal.tokenizers import IMAGE_TOKENIZERS

# The settings ``model.contrastive`` may hold for an any-to-any model.
ANY_TO_ANY_CONTRASTIVE = ("embed_dim", "unique_labels")

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
        if task not in TASK_NAMES:
            raise ConfigError(f"model.tasks: unknown task {task!r}; valid: {', '.join(TASK_NAMES)}")
    check_parts(config)
    for task in model.tasks:
        if task == CONTRASTIVE:
            if len(model.encoders) < 2:
                raise ConfigError(f"model.tasks: {CONTRASTIVE} aligns two or more modalities; model.encoders has {list(model.encoders)}")
            continue
        source, _ = TASKS[task]
        if source.value not in model.encoders:
            raise ConfigError(f"model.encoders.{source}: task {task} needs a {source} encoder; add one or drop the task")
    generating = [task for task in ("text_to_image", "text_to_audio") if task in model.tasks]
    if generating and config.data.source != "spoken_numbers":
        raise ConfigError(
            f"model.tasks: {', '.join(generating)} learn(s) from aligned references, which only the built-in "
            "data makes (data.source: spoken_numbers); drop them for manifest data"
        )
    if "text_to_image" in model.tasks:
        IMAGE_TOKENIZERS.check(model.image_tokenizer, where="model.image_tokenizer")
        if model.image_tokenizer.get("name") != "vqvae":
            raise ConfigError(
                f"model.image_tokenizer.name: text_to_image generates discrete codes and needs 'vqvae', "
                f"got {model.image_tokenizer.get('name')!r}"
            )
    try:
        check_task_fractions(model.task_fractions, model.tasks)
    except ValueError as exc:
        raise ConfigError(f"model.{exc}") from None
    unknown = set(model.contrastive) - set(ANY_TO_ANY_CONTRASTIVE)
    if unknown:
        raise ConfigError(
            f"model.contrastive: unknown setting(s) {sorted(unknown)} for any_to_any; valid: {', '.join(ANY_TO_ANY_CONTRASTIVE)}"
        )


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
    image_tokenizer = None
    if "text_to_image" in model.tasks:  # its weights come from the run's first stage
        image_tokenizer = IMAGE_TOKENIZERS.build(model.image_tokenizer, where="model.image_tokenizer")
    assembled = AnyToAnyModel(
        encoders=parts.encoders,
        projectors=parts.projectors,
        backbone=parts.backbone,
        dim=model.dim,
        text=shapes.text,
        tasks=model.tasks,
        image_tokenizer=image_tokenizer,
        image_size=shapes.image_size,
        audio=AudioTargets(shapes.num_mels, shapes.num_audio_frames, model.audio_frames_per_token),
        task_fractions=model.task_fractions,
        **model.contrastive,
    )
    policy = getattr(parts.backbone, "freeze", None)
    if policy is not None:  # a pretrained LM's freezing policy also covers the encoders
        from polymodal.backbones.hf_causal_lm import apply_freeze_policy

        apply_freeze_policy(assembled, policy)
    return assembled
