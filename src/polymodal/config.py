"""The typed config tree: dataclasses, YAML presets, ``key=value`` overrides, validation, dump.

Merge order: dataclass defaults < shipped preset < user YAML < command-line ``key=value``.
Part specs (``{"name": ..., **settings}``) are checked against their registry's constructors by
``polymodal.validation.check_parts`` before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import re
import importlib.resources
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from polymodal.data.augment import AugmentSettings
from polymodal.errors import ConfigError
from polymodal.overrides import deep_merge as _deep_merge
from polymodal.overrides import parse_override
from polymodal.training.gradient_surgery import check_gradient_surgery
from polymodal.training.probe import diagnostics_settings
from polymodal.training.schedules import check_loss_schedules

PRESET_PACKAGE = "polymodal.configs"
DEFAULT_PRESET = "default"


@dataclasses.dataclass
class DataConfig:
    """Where samples come from and how they are cut."""

    source: str = "manifest"  # a dataset plug-in (polymodal.datasets): manifest, or a built-in dataset
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # the plug-in's own settings
    manifest: str | None = None  # JSONL with image/text/audio paths; needed when source=manifest
    val_manifest: str | None = None  # optional held-out JSONL for evaluation of a manifest run
    image_height: int = 32
    image_width: int = 96
    image_channels: int = 1  # 1: grey (the images are converted on load), 3: RGB
    sample_rate: int = 16000
    max_audio_seconds: float = 2.0  # longer clips are cut
    num_mels: int = 64
    n_fft: int = 400  # 25 ms window at 16 kHz
    hop_length: int = 160  # 10 ms hop at 16 kHz
    top_db: float | None = None  # floor each clip's log-mel this many dB below its peak (None: no floor)
    trim_db: float | None = None  # cut leading/trailing audio this many dB below the loudest frame (None: keep)
    # Normalise log-mel frames by their speaker's statistics (a manifest line's "speaker"), a clip
    # without one by its own: polymodal.data.speaker_norm. The audio encoder's input_norm must be off.
    speaker_norm: bool = False
    max_text_tokens: int = 24
    vocab_size: int = 512  # BPE vocabulary trained on the training captions
    num_workers: int = 0
    # Training-split augmentation (audio chain, SpecAugment, image chain), all off by default;
    # deterministic per (seed, epoch, item): see polymodal.data.augment.
    augment: AugmentSettings = dataclasses.field(default_factory=AugmentSettings)


@dataclasses.dataclass
class ModelConfig:
    """The model's parts. Each part is ``{"name": registry name, **keyword-only settings}``.

    ``architecture`` picks what a run trains: ``any_to_any`` (encoders, projector, shared backbone,
    tasks), ``clip`` (contrastive towers: encoders, projector, shared backbone, ``contrastive``
    settings) or ``image_tokenizer`` (only ``image_tokenizer``: a VQ-VAE or VAE on the images).

    ``init_from`` starts a fresh run from a trained run's folder: its text tokenizer, and every
    tensor of its checkpoint whose name the new model shares (``training.run``).
    """

    architecture: str = "any_to_any"
    image_tokenizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "vqvae"})
    dim: int = 256
    encoders: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # modality -> spec
    projector: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "linear"})
    backbone: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "transformer"})
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["image_to_text", "audio_to_text"])
    contrastive: dict[str, Any] = dataclasses.field(default_factory=dict)  # settings of the contrastive task
    task_fractions: dict[str, float] = dataclasses.field(default_factory=dict)  # task -> share of each batch
    heads: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # target modality -> head spec
    decoupler: dict[str, Any] = dataclasses.field(default_factory=dict)  # a decoupler spec; {} for none
    init_from: str | None = None  # a trained run's folder: the tokenizer and the weights that fit


@dataclasses.dataclass
class TrainConfig:
    """Optimisation, precision, logging, checkpoints, and how named loss terms are combined.

    A model returns named, unweighted loss terms; the loop sums them weighted. Three keys say how:

    ``loss_weights``: ``{name: weight}``, a constant weight per term (default 1).

    ``loss_schedules``: ``{name: [[progress, weight], ...]}``, a piecewise-linear weight over the
    fraction of ``steps`` done (0 at the first step), constant before the first point and after the
    last, points sorted by progress in [0, 1] (two points at one progress make a step change),
    weights >= 0. A schedule multiplies the term's ``loss_weights`` entry. E.g. a shared bridge
    opened after 30% of training and at full weight by 60%:
    ``contrastive_image_text: [[0, 0], [0.3, 0], [0.6, 1]]``. The weight of every term at each
    logged step is in ``metrics.jsonl`` / TensorBoard as ``weight/<name>``. The same fraction is
    given to every sub-module of the model that defines ``set_progress(fraction)``, before each step.

    ``gradient_surgery``: ``{"name": "none" | "pcgrad" | "gradnorm", **settings}``:
    ``none`` one backward of the weighted sum; ``pcgrad`` (settings ``seed``, ``losses``)
    projects each term's gradient off those it conflicts with; ``gradnorm`` (settings ``alpha``,
    ``lr``, ``losses``, ``layer``) learns extra per-term weights that equalise the terms' training
    rates (logged as ``gradnorm/<name>``). ``losses`` lists the terms the surgery acts on (default
    all; others are added plainly). Both cost one backward pass per term (about 3x the step with
    four terms), except ``gradnorm`` with ``layer`` (the last shared layer's parameter prefix, e.g.
    ``backbone.final_norm``), which costs about 1.1x. See :mod:`polymodal.training.gradient_surgery`.
    """

    steps: int = 2000
    batch_size: int = 64
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    precision: str = "auto"  # auto (bf16 where the device runs it fast) | bf16 | fp32
    log_every: int = 10
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    progress: bool = True
    # Batches collated ahead in a background thread while a step runs; 0: none. Off by default: on
    # 2 CPU cores the thread's collation takes a core from the step's matmuls, and the default
    # preset's step measured 926 ms with 2 ahead against 551-679 ms with none (BENCHMARKS.md).
    # Worth it where collation has a core of its own, or on a GPU.
    prefetch: int = 0
    compile: bool = False  # torch.compile the model's repeated blocks (BENCHMARKS.md: slower to start)
    fsdp: bool = False  # several processes: shard weights, gradients, optimiser state (FSDP2) instead of DDP
    loss_weights: dict[str, float] = dataclasses.field(default_factory=dict)  # loss name -> weight (default 1)
    loss_schedules: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> [[progress, weight], ...]
    gradient_surgery: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "none"})
    # A step with a non-finite loss or gradient is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = 10
    # {every: N, items: 256, conflict_items: 32}: the live diagnostics (polymodal.training.probe); every 0 is off
    diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A periodic val figure (e.g. audio_to_text/exact; higher is better): the best checkpoint by
    # it is kept in checkpoints/best and used by eval, generate and the final test evaluation.
    select: str | None = None
    early_stop: int = 0  # with select: stop after this many evaluations without a new best; 0: off
    # Cache the features of fully frozen encoders per training item (off | memory | a folder).
    feature_cache: str = "off"


# The VQ-VAE's own training settings (the ``vqvae`` preset's): no decay, clipping or warmup.
TOKENIZER_TRAIN = TrainConfig(
    steps=500,
    batch_size=32,
    lr=2e-3,
    warmup_steps=0,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    grad_clip=0.0,
    log_every=25,
    ckpt_every=100,
    loss_weights={"commitment": 0.25},
)


@dataclasses.dataclass
class Config:
    """The whole run. Written resolved to ``run_dir/config.yaml``; that file alone reproduces the run."""

    seed: int = 0
    run_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # The first stage of an any-to-any run with text_to_image: training ``model.image_tokenizer``.
    tokenizer_train: TrainConfig = dataclasses.field(
        default_factory=lambda: dataclasses.replace(TOKENIZER_TRAIN, loss_weights=dict(TOKENIZER_TRAIN.loss_weights))
    )


PRECISIONS = ("auto", "bf16", "fp32")


# ----------------------------------------------------------------------------- presets


def preset_names() -> list[str]:
    """Names of the YAML presets shipped inside the package."""
    root = importlib.resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(preset_names())}")
    return importlib.resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()


def preset_summary(name: str) -> str:
    """The first comment line of a preset: what it is for."""
    for line in preset_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


# ----------------------------------------------------------------------------- merging


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{origin}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(configs: Sequence[str] = (), overrides: Iterable[str] = ()) -> Config:
    """Resolve a config: defaults < shipped preset < user YAML files < ``key=value`` overrides.

    Args:
        configs: preset names or YAML paths, merged in order. When none of them is a preset name,
            the ``default`` preset goes first, so a user file only says what differs.
        overrides: ``key=value`` strings with dotted keys, e.g. ``train.steps=100``.
    """
    is_file = [c.endswith((".yaml", ".yml")) or Path(c).is_file() for c in configs]
    if all(is_file):
        configs = [DEFAULT_PRESET, *configs]
        is_file = [False, *is_file]
    merged = to_dict(Config())
    for name, from_file in zip(configs, is_file):
        if from_file:
            path = Path(name)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist; give a YAML path or a preset ({', '.join(preset_names())})")
            merged = _deep_merge(merged, _read_yaml(path.read_text(), str(path)))
        else:
            merged = _deep_merge(merged, _read_yaml(preset_text(name), f"preset {name}"))
    for item in overrides:
        merged = _deep_merge(merged, parse_override(item))
    config = from_dict(Config, merged)
    validate(config)
    return config


def load_run_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> Config:
    """The resolved config a run wrote to ``run_dir/config.yaml``, with optional ``key=value`` on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: {path} is missing (train one with `polymodal train`)")
    merged = _read_yaml(path.read_text(), str(path))
    for item in overrides:
        merged = _deep_merge(merged, parse_override(item))
    config = from_dict(Config, merged)
    validate(config)
    return config


# ----------------------------------------------------------------------------- typed conversion


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key {key!r}; valid: {', '.join(fields)}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        values[name] = _coerce(hints[name], value, key)
    return cls(**values)


# A decimal number in exponent notation, e.g. 2e-3 or 1E4.
_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, key)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "2e-3" (no dot) as a string; a person means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return value


def to_dict(config: Any) -> Any:
    """Plain dicts/lists (tuples become lists) ready for YAML."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def check_selection(train: TrainConfig) -> None:
    """``train.select`` needs periodic evaluation; ``train.early_stop`` needs a figure to watch."""
    if train.select is not None and train.eval_every <= 0:
        raise ConfigError(f"train.select={train.select}: needs periodic evaluation; set train.eval_every (e.g. 100)")
    if train.early_stop < 0:
        raise ConfigError(f"train.early_stop: must be >= 0 (evaluations without a new best), got {train.early_stop}")
    if train.early_stop and train.select is None:
        raise ConfigError("train.early_stop: stops on a figure; name it with train.select (e.g. audio_to_text/exact)")


def validate(config: Config) -> None:
    """The one validation path of a config: the values of the tree here, then every part spec and
    the dataset plug-in through their registries (``polymodal.validation``), before anything is built."""

    def choice(key: str, value: str, valid: Iterable[str]) -> None:
        valid = tuple(valid)
        if value not in valid:
            raise ConfigError(f"{key}: {value!r} is not valid; valid: {', '.join(valid)}")

    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value!r}")

    choice("train.precision", config.train.precision, PRECISIONS)
    for section in ("train", "tokenizer_train"):
        for key in ("steps", "batch_size", "grad_accum", "lr", "log_every", "ckpt_every", "max_nonfinite_steps"):
            positive(f"{section}.{key}", getattr(getattr(config, section), key))
        check_loss_schedules(getattr(config, section).loss_schedules, f"{section}.loss_schedules")
        check_gradient_surgery(getattr(config, section).gradient_surgery, f"{section}.gradient_surgery")
        diagnostics_settings(getattr(config, section).diagnostics, f"{section}.diagnostics")
    for key in ("image_height", "image_width", "image_channels", "sample_rate", "num_mels", "hop_length", "vocab_size"):
        positive(f"data.{key}", getattr(config.data, key))
    positive("data.max_audio_seconds", config.data.max_audio_seconds)
    for key in ("top_db", "trim_db"):
        if getattr(config.data, key) is not None:
            positive(f"data.{key}", getattr(config.data, key))
    from polymodal.data.text import MIN_VOCAB_SIZE

    if config.data.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(f"data.vocab_size: a byte-level BPE needs at least {MIN_VOCAB_SIZE} (256 bytes and 3 specials), got {config.data.vocab_size}")
    positive("model.dim", config.model.dim)
    check_selection(config.train)
    for section in ("train", "tokenizer_train"):
        for key in ("warmup_steps", "prefetch"):
            value = getattr(getattr(config, section), key)
            if value < 0:
                raise ConfigError(f"{section}.{key}: must be >= 0, got {value}")
    if config.device != "auto" and config.device != "cpu" and not config.device.startswith("cuda"):
        raise ConfigError(f"device: {config.device!r} is not valid; valid: auto, cpu, cuda, cuda:N")
    from polymodal.validation import check_parts

    check_parts(config)
