"""A run: its config, folder, dataset plug-in, tokenizer, collator and model, prepared for training
(data read, tokenizer trained, references made) or loaded from its folder for use (no data read:
the splits load on first use, so ``generate`` starts in about a second plus the checkpoint load).

A fresh run with ``model.init_from=RUN`` starts from another trained run instead of from scratch:
it takes that run's text tokenizer (the ids its embeddings and LM head index) and, from the
checkpoint ``load_run`` would use, every tensor whose name the new model shares (a shared name of
another shape is an error: the shared parts must be configured alike). The rest keep their
initialisation, and the log names them. That is fine-tuning when the configs agree, and
MetaQuery's setup (a trained backbone under a new generator, Pan et al. 2025, arXiv:2504.06256)
with a new head whose ``train_backbone: false`` keeps the loaded backbone as it is. Every rank
loads the same weights; a resumed run loads its own checkpoint instead.

Which weights a loaded run has: a run trained with ``train.select`` keeps its best checkpoint by
that validation figure in ``checkpoints/best/`` (``training.selection``), and ``load_run`` (so
``polymodal eval`` and ``generate``) loads it; any other run loads its latest ``step_*``
checkpoint. ``load_run(run_dir, checkpoint="latest")`` loads the latest either way.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

import safetensors
import torch
from torch import nn

from polymodal.config import Config, load_run_config
from polymodal.data.collate import Collator, build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets.base import DataSource, Splits, build_source
from polymodal.distributed.process import resolve_device
from polymodal.errors import ConfigError
from polymodal.modality import Modality
from polymodal.models.architectures import build_model, check_model
from polymodal.models.shapes import DataShapes, TextSpecials
from polymodal.encoders import ENCODERS
from polymodal.training.checkpoint import MODEL_FILE, latest_checkpoint, load_checkpoint, one_line_reason
from polymodal.training.schedules import restore_progress
from polymodal.training.selection import best_dir, read_best

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
CHECKPOINT_CHOICES = ("auto", "best", "latest")


@dataclasses.dataclass
class Run:
    """A built run (weights as initialised or loaded); ``splits`` reads the data on first use."""

    config: Config
    run_dir: Path
    source: DataSource
    tokenizer: TextTokenizer
    collator: Collator
    model: nn.Module
    loaded_splits: Splits | None = None
    checkpoint: str | None = None  # the checkpoint folder the weights came from (None: as initialised)

    @property
    def splits(self) -> Splits:
        if self.loaded_splits is None:
            self.loaded_splits = self.source.load()
            fit_speakers(self.collator, self.loaded_splits)
        return self.loaded_splits


def data_shapes(config: Config, tokenizer: TextTokenizer, collator: Collator, log_mel: tuple[float, float] = (0.0, 1.0)) -> DataShapes:
    """The sizes the model is wired with: the data config's, the tokenizer's and the collator's."""
    data = config.data
    return DataShapes(
        image_size=(data.image_height, data.image_width),
        num_mels=data.num_mels,
        text=TextSpecials(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id),
        image_channels=data.image_channels,
        num_audio_frames=int(collator.log_mel.frame_lengths(torch.tensor(collator.max_audio_samples))),
        log_mel_center=log_mel[0],
        log_mel_scale=log_mel[1],
    )


def audio_input(config: Config) -> str:
    """What the run's audio encoder reads: ``waveform`` if its class says so, else ``log_mel``."""
    spec = config.model.encoders.get(Modality.AUDIO.value)
    if spec is None:
        return "log_mel"
    return getattr(ENCODERS.get(spec["name"]), "input_kind", "log_mel")


def run_collator(config: Config, tokenizer: TextTokenizer, source: DataSource, references=None) -> Collator:
    """The collator of a run: its data settings, references, the dataset's front end, and the input
    its audio encoder reads."""
    return build_collator(
        tokenizer, config.data, references=references, front_end=source.source_text, audio_input=audio_input(config), seed=config.seed
    )


def fit_speakers(collator: Collator, splits: Splits) -> None:
    """``data.speaker_norm``'s statistics of every speaker in the run's splits (nothing without it)."""
    collator.fit_speakers([splits.train, splits.val, splits.test])


def prepare_run(config: Config, run_dir: Path, *, resume: bool) -> Run:
    """Everything a training stage needs: the data, the tokenizer (trained on the training captions,
    or the run's own on resume), the dataset's references for heads that learn from them, its
    log-mel statistics, and the model (weights as initialised, or from ``model.init_from`` on a fresh run)."""
    fresh = config.model.init_from and latest_checkpoint(run_dir) is None  # every rank of a fresh run
    initial = initial_checkpoint(config.model.init_from) if fresh else None
    source = build_source(config.data, config.seed)
    splits = source.load()
    tokenizer_path = run_dir / TOKENIZER_FILE
    if resume:
        tokenizer = TextTokenizer.load(tokenizer_path)
    elif initial is not None:  # the ids the loaded embeddings and LM head index
        tokenizer = TextTokenizer.load(Path(config.model.init_from) / TOKENIZER_FILE)
        tokenizer.save(tokenizer_path)
    else:
        if not splits.train_texts:
            raise ConfigError('the training data has no captions: the text tokenizer needs some (add "text" lines)')
        tokenizer = TextTokenizer.train(splits.train_texts, vocab_size=config.data.vocab_size)
        tokenizer.save(tokenizer_path)
    heads = dict(getattr(check_model(config), "heads", {}))  # built on meta: which targets need what
    targets = [Modality(key) for key, head in heads.items() if head.reads_references]
    references = source.references(splits, targets) if targets else {}
    collator = run_collator(config, tokenizer, source, references)
    fit_speakers(collator, splits)
    log_mel = source.log_mel_statistics(splits, collator) if Modality.AUDIO.value in heads else (0.0, 1.0)
    model = build_model(config, data_shapes(config, tokenizer, collator, log_mel))
    if initial is not None:
        load_matching_weights(model, initial)
    return Run(config, run_dir, source, tokenizer, collator, model, splits)


def initial_checkpoint(init_from: str) -> Path:
    """The checkpoint folder ``model.init_from`` names: the run's best by ``train.select`` if it
    keeps one, else its latest (as ``load_run``).

    Raises:
        ConfigError: the folder is not a trained run (no config, tokenizer or checkpoint).
    """
    run_dir = Path(init_from)
    missing = [name for name in ("config.yaml", TOKENIZER_FILE) if not (run_dir / name).is_file()]
    if missing:
        raise ConfigError(f"model.init_from={init_from}: not a trained run's folder (no {' or '.join(missing)}); give the run_dir of a finished `polymodal train`")
    found = chosen_checkpoint(run_dir, load_run_config(run_dir))
    if found is None or not (found / MODEL_FILE).is_file():
        raise ConfigError(f"model.init_from={init_from}: the run has no whole checkpoint (model.safetensors) to start from; train it first")
    return found


def load_matching_weights(model: nn.Module, checkpoint: Path) -> int:
    """Copy into ``model`` every tensor of ``checkpoint``'s weights whose name it shares
    (parameters and buffers); the log names the model's tensors left as initialised. Returns how
    many were copied.

    Raises:
        ConfigError: the file cannot be read, a shared name has another shape (the shared parts are
            configured otherwise), or no name is shared (another kind of model).
    """
    own = model.state_dict()
    path = checkpoint / MODEL_FILE
    copied, other_shape = [], []
    try:
        with safetensors.safe_open(str(path), framework="pt") as saved, torch.no_grad():
            for name in saved.keys():
                if name not in own:
                    continue
                tensor = saved.get_tensor(name)
                if tensor.shape != own[name].shape:
                    other_shape.append(f"{name} {tuple(tensor.shape)} -> {tuple(own[name].shape)}")
                    continue
                own[name].copy_(tensor)
                copied.append(name)
    except (safetensors.SafetensorError, OSError) as exc:
        raise ConfigError(f"model.init_from: {path} is corrupt or unreadable ({one_line_reason(exc)})") from None
    if other_shape:  # a part both models have, configured otherwise: loading around it would hide that
        raise ConfigError(
            f"model.init_from: {len(other_shape)} tensors of {path} have another shape here ({'; '.join(other_shape[:3])}); "
            "the parts both runs share need the same settings (model.dim, model.encoders, model.backbone)"
        )
    if not copied:
        raise ConfigError(f"model.init_from: no tensor of {path} has a name this model shares; was it trained with another model.architecture?")
    loaded = {own[name].data_ptr() for name in copied}  # tied tensors are saved once, under one name
    kept = collections.Counter(".".join(name.split(".")[:2]) for name, tensor in own.items() if tensor.data_ptr() not in loaded)
    parts = ", ".join(f"{part} ({count})" for part, count in sorted(kept.items()))
    logger.info("model.init_from: %d tensors from %s; kept as initialised: %s", len(copied), checkpoint, parts or "none")
    return len(copied)


def chosen_checkpoint(run_dir: str | Path, config: Config, checkpoint: str = "auto") -> Path | None:
    """The checkpoint a loaded run uses: ``auto`` the best by ``train.select`` when the run keeps one,
    else the latest; ``best`` or ``latest`` to ask for one."""
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ConfigError(f"checkpoint={checkpoint!r}; valid: {', '.join(CHECKPOINT_CHOICES)}")
    if checkpoint == "best" or (checkpoint == "auto" and config.train.select is not None and read_best(run_dir)):
        if read_best(run_dir) is None:
            raise ConfigError(f"{run_dir} keeps no best checkpoint (train it with train.select=<val figure>)")
        return best_dir(run_dir)
    return latest_checkpoint(run_dir)


def load_run(run_dir: str | Path, config: Config | None = None, *, checkpoint: str = "auto", device: str = "auto") -> Run:
    """A trained run rebuilt from its folder: ``config.yaml`` (or ``config``), the tokenizer and a
    checkpoint's weights (``chosen_checkpoint``: by default the best by ``train.select`` if the run
    keeps one, else the latest), on ``device``: by default this machine's GPU when it has one, else
    the CPU, wherever the run was trained. Reads no data."""
    run_dir = Path(run_dir)
    config = config or load_run_config(run_dir)
    found = chosen_checkpoint(run_dir, config, checkpoint)
    if found is None:
        raise ConfigError(f"{run_dir} has no checkpoint; train it first with `polymodal train run_dir={run_dir}`")
    source = build_source(config.data, config.seed)
    tokenizer = TextTokenizer.load(run_dir / TOKENIZER_FILE)
    collator = run_collator(config, tokenizer, source)
    model = build_model(config, data_shapes(config, tokenizer, collator))  # statistics come with the weights
    restore_progress(model, load_checkpoint(found, model=model).get("step"), config.train.steps)
    model.to(resolve_device(device))
    return Run(config, run_dir, source, tokenizer, collator, model, checkpoint=str(found))
