"""What a run can train, registered in ``ARCHITECTURES`` (``model.architecture``): how each is
assembled from a config, whether it needs an image tokenizer trained first, and how it is scored.

Each entry has ``build(config, shapes)``, ``needs_image_tokenizer(config)`` and ``evaluate(run,
...)`` (its figures, from ``polymodal.evaluation.run``). Assembly passes the wiring (sizes from ``DataShapes``, widths, the trained image tokenizer); the
config owns the settings. Building on the meta device allocates nothing, so ``check`` validates a
whole config by building it there: every part spec meets its registry's signature and every
constructor's own checks, before any data or weights exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from polymodal.config import Config
from polymodal.decoupling import DECOUPLERS
from polymodal.errors import ConfigError
from polymodal.heads import DEFAULT_HEADS, HEADS, HeadWiring
from polymodal.modality import Modality
from polymodal.models.any_to_any import AnyToAnyModel
from polymodal.models.clip import LOSS_PREFIX, ClipModel
from polymodal.models.image_tokenizer import ImageTokenizerModel
from polymodal.models.parts import build_trunk
from polymodal.models.shapes import DataShapes, TextSpecials
from polymodal.registry import Registry
from polymodal.tasks import TASKS, GenerationTask
from polymodal.tokenizers import IMAGE_TOKENIZERS

ARCHITECTURES: Registry = Registry("architecture")
# Random fills that do nothing to a meta tensor. Run there, torch's reference ``normal_`` imports
# its compiler (about 3 s); skipping them keeps checking a config fast.
_RANDOM_FILLS = {
    torch.nn.init.normal_, torch.nn.init.trunc_normal_, torch.nn.init.uniform_, torch.nn.init.xavier_uniform_,
    torch.nn.init.xavier_normal_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
    torch.nn.init.orthogonal_, Tensor.normal_, Tensor.uniform_,
}  # fmt: skip


class _SkipMetaFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
        if func in _RANDOM_FILLS and isinstance(target, Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build parts on the meta device: shapes and checks only, nothing allocated or filled."""
    with torch.device("meta"), _SkipMetaFills():
        yield


@ARCHITECTURES.register("any_to_any")
class AnyToAny:
    """Encoders, one shared backbone, a head per target modality, and ``model.tasks``."""

    @staticmethod
    def build(config: Config, shapes: DataShapes) -> nn.Module:
        model = config.model
        inputs, backbone = build_trunk(config, shapes)
        decoupler = _build_decoupler(config, inputs.modalities)
        tasks = {name: _build_task(config, name, inputs.modalities, decoupler) for name in model.tasks}
        targets = [t.target for t in tasks.values() if isinstance(t, GenerationTask)]
        specs = {m: model.heads.get(m.value, {"name": DEFAULT_HEADS[m]}) for m in dict.fromkeys(targets)}
        tokenizer = None
        if any(HEADS.check(spec, where=f"model.heads.{m}")[0].needs_image_tokenizer for m, spec in specs.items()):
            tokenizer = IMAGE_TOKENIZERS.build(model.image_tokenizer, where="model.image_tokenizer")  # stage 1 trains it
        wiring = HeadWiring(model.dim, shapes, tokenizer)
        heads = {m: _build_head(spec, m, wiring) for m, spec in specs.items()}
        assembled = AnyToAnyModel(inputs, backbone, heads, tasks)
        policy = getattr(backbone, "freeze", None)
        if policy is not None:  # a pretrained LM's freezing policy also covers the encoders
            from polymodal.backbones.hf_causal_lm import apply_freeze_policy

            apply_freeze_policy(assembled, policy)
        return assembled

    @staticmethod
    def needs_image_tokenizer(config: Config) -> bool:
        """Whether the run trains ``model.image_tokenizer`` first (a head decodes with it)."""
        with on_meta():
            return AnyToAny.build(config, placeholder_shapes(config)).image_tokenizer is not None

    @staticmethod
    def evaluate(run, **options) -> dict:
        from polymodal.evaluation.run import evaluate_any_to_any

        return evaluate_any_to_any(run, **options)


@ARCHITECTURES.register("clip")
class Clip:
    """Contrastive towers on one shared backbone; ``model.contrastive`` holds the settings."""

    @staticmethod
    def build(config: Config, shapes: DataShapes) -> nn.Module:
        inputs, backbone = build_trunk(config, shapes)
        decoupler = _build_decoupler(config, inputs.modalities)
        spec = {"name": "contrastive", **config.model.contrastive}
        contrastive = TASKS.build(spec, config.model.dim, inputs.modalities, LOSS_PREFIX, decoupler, where="model.contrastive")
        return ClipModel(inputs, backbone, contrastive)

    @staticmethod
    def needs_image_tokenizer(config: Config) -> bool:
        return False

    @staticmethod
    def evaluate(run, **options) -> dict:
        from polymodal.evaluation.run import evaluate_clip

        return evaluate_clip(run, **options)


@ARCHITECTURES.register("image_tokenizer")
class ImageTokenizer:
    """``model.image_tokenizer`` alone (a VQ-VAE or VAE) on the images."""

    @staticmethod
    def build(config: Config, shapes: DataShapes) -> nn.Module:
        return ImageTokenizerModel(IMAGE_TOKENIZERS.build(config.model.image_tokenizer, where="model.image_tokenizer"))

    @staticmethod
    def needs_image_tokenizer(config: Config) -> bool:
        return False

    @staticmethod
    def evaluate(run, **options) -> dict:
        from polymodal.evaluation.run import evaluate_image_tokenizer

        return evaluate_image_tokenizer(run, **options)


def _build_decoupler(config: Config, modalities: list[Modality]) -> nn.Module | None:
    """``model.decoupler`` (read by the contrastive task), or None when it is empty."""
    spec = config.model.decoupler
    if not spec:
        return None
    if config.model.architecture == "any_to_any" and "contrastive" not in config.model.tasks:
        raise ConfigError("model.decoupler: a decoupler summarises what the contrastive task aligns; add the task 'contrastive'")
    return DECOUPLERS.build(spec, config.model.dim, modalities, where="model.decoupler")


def _build_task(config: Config, name: str, modalities: list[Modality], decoupler: nn.Module | None) -> nn.Module:
    """Task ``name`` with its settings: ``model.contrastive`` (and the decoupler) for the contrastive
    task, its share of each batch (``model.task_fractions``) for a generation task."""
    model = config.model
    index = f"model.tasks[{model.tasks.index(name)}]"
    TASKS.check({"name": name}, where=index)
    if name == "contrastive":
        spec = {"name": name, **model.contrastive}
        return TASKS.build(spec, model.dim, modalities, decoupler=decoupler, where="model.contrastive")
    settings = {"fraction": model.task_fractions[name]} if name in model.task_fractions else {}
    task = TASKS.build({"name": name, **settings}, model.dim, modalities, where=f"model.task_fractions.{name}")
    if isinstance(task, GenerationTask) and task.source not in modalities:
        raise ConfigError(f"{index}: {name} needs a {task.source} encoder; add model.encoders.{task.source} or drop the task")
    return task


def _build_head(spec: dict, target: Modality, wiring: HeadWiring) -> nn.Module:
    head = HEADS.build(spec, wiring, where=f"model.heads.{target}")
    if head.target is not target:
        valid = [n for n in HEADS.names() if HEADS.get(n).target is target]
        raise ConfigError(f"model.heads.{target}.name: {spec['name']!r} makes {head.target}, not {target}; valid: {', '.join(valid)}")
    return head


def build_model(config: Config, shapes: DataShapes) -> nn.Module:
    """The model ``config.model.architecture`` names, with every part built and wired."""
    return ARCHITECTURES.get(config.model.architecture).build(config, shapes)


def placeholder_shapes(config: Config) -> DataShapes:
    """Shapes from the config alone (the vocabulary at its largest), for building on the meta device."""
    data = config.data
    hop_frames = int(round(data.max_audio_seconds * data.sample_rate)) // data.hop_length + 1
    return DataShapes(
        image_size=(data.image_height, data.image_width),
        num_mels=data.num_mels,
        text=TextSpecials(data.vocab_size, 0, 1, 2),
        image_channels=data.image_channels,
        num_audio_frames=hop_frames,
    )


def check_model(config: Config) -> nn.Module:
    """Build ``config.model`` on the meta device and return it: a bad part name, setting or value
    fails here with a ConfigError naming its key, before any data or weights exist."""
    if config.model.architecture not in ARCHITECTURES:
        raise ConfigError(f"model.architecture: {config.model.architecture!r} is not valid; valid: {', '.join(ARCHITECTURES.names())}")
    for name in config.model.task_fractions:
        if name not in config.model.tasks or name == "contrastive":
            valid = ", ".join(t for t in config.model.tasks if t != "contrastive")
            raise ConfigError(f"model.task_fractions.{name}: not a generation task of this model; valid: {valid}")
    with on_meta():
        return build_model(config, placeholder_shapes(config))
