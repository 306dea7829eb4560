"""A whole training job: config -> run folder, data, tokenizer, model, fit, evaluation.

The run folder holds everything needed to reproduce and use the run: ``config.yaml`` (resolved),
``tokenizer.json``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/`` and ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Subset
from torch.utils.tensorboard import SummaryWriter

from polymodal.config import Config, to_dict
from polymodal.data.references import reference_images, reference_speech
from polymodal.data.collate import build_collator
from polymodal.data.sources import DataBundle, build_data
from polymodal.data.text import TextTokenizer
from polymodal.errors import ConfigError
from polymodal.evaluation.captioning import caption_accuracy
from polymodal.evaluation.reconstruction import image_grid, reconstruction_figures, save_png
from polymodal.evaluation.generation import (
    SPEECH_EVAL_ITEMS,
    load_judges,
    reconstructed_probe_accuracy,
    reference_round_trip_accuracy,
    text_to_audio_figures,
    text_to_image_figures,
    vocoder_for,
    write_samples,
)
from polymodal.evaluation.retrieval import retrieval_figures
from polymodal.evaluation.zero_shot import clip_figures, embed_dataset
from polymodal.modality import Modality
from polymodal.models.any_to_any import TASKS, TextSpecials
from polymodal.models.build import DataShapes, build_model, check_model_config
from polymodal.models.clip import ClipModel
from polymodal.models.image_tokenizer import ImageTokenizerModel
from polymodal.training.checkpoint import latest_checkpoint, load_checkpoint
from polymodal.training.loop import fit
from polymodal.training.metrics_log import TENSORBOARD_DIR
from polymodal.training.run_lock import RunLock

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
EVAL_FILE = "eval.json"
RECONSTRUCTION_FILE = "reconstructions.png"
SAMPLES_DIR = "samples"
# The first stage of a run with text_to_image: the VQ-VAE, trained in this subfolder.
TOKENIZER_STAGE_DIR = "image_tokenizer"
# Items scored by the periodic (in-training) evaluation: enough for a trend, cheap enough to repeat.
PERIODIC_EVAL_ITEMS = 256


@dataclasses.dataclass
class Run:
    """A built run: its config, data, tokenizer, collator and model (weights as initialised or loaded)."""

    config: Config
    run_dir: Path
    data: DataBundle
    tokenizer: TextTokenizer
    collator: object
    model: nn.Module


def prepare(config: Config, *, run_dir: Path, train_tokenizer: bool) -> Run:
    """Build data, tokenizer (trained, or loaded from the run folder), collator and model."""
    check_model_config(config)  # fail on a bad part spec before building any data
    data = build_data(config.data, seed=config.seed)
    tokenizer_path = run_dir / TOKENIZER_FILE
    if train_tokenizer:
        if not data.train_texts:
            raise ConfigError("the training data has no captions: the text tokenizer needs some (add \"text\" lines)")
        tokenizer = TextTokenizer.train(data.train_texts, vocab_size=config.data.vocab_size)
        tokenizer.save(tokenizer_path)
    else:
        tokenizer = TextTokenizer.load(tokenizer_path)
    references = {}  # what text -> audio and text -> image learn from (data/references.py)
    tasks = config.model.tasks if config.model.architecture == "any_to_any" else []
    if "text_to_audio" in tasks:
        references[Modality.AUDIO] = reference_speech(data.train_labels, sample_rate=config.data.sample_rate)
    if "text_to_image" in tasks:
        references[Modality.IMAGE] = reference_images(
            data.train_labels, data.glyphs, height=config.data.image_height, width=config.data.image_width
        )
    collator = build_collator(tokenizer, config.data, references=references)
    shapes = DataShapes(
        image_size=(config.data.image_height, config.data.image_width),
        num_mels=config.data.num_mels,
        text=TextSpecials(tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id),
        num_audio_frames=int(collator.log_mel.frame_lengths(torch.tensor(collator.max_audio_samples))),
    )
    model = build_model(config, shapes)
    return Run(config, run_dir, data, tokenizer, collator, model)


def evaluate_run(run: Run, *, split: str = "test", limit: int | None = None, generate: bool = True) -> dict:
    """The run's figures on a split.

    Any-to-any: X -> text exact match, retrieval R@K for every pair (with ``contrastive``) and, if
    ``generate``, the probe-judged correctness of text -> image and text -> audio, the image
    tokenizer's PSNR, and sample generations in ``samples/``. CLIP: zero-shot accuracy and
    retrieval. Image tokenizer: reconstruction quality and code usage (and ``reconstructions.png``).
    """
    device = next(run.model.parameters()).device
    dataset = getattr(run.data, split)
    if isinstance(run.model, ImageTokenizerModel):
        if limit is not None:
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        figures, preview = reconstruction_figures(run.model.tokenizer, dataset, run.collator, device=device)
        save_png(image_grid(preview), run.run_dir / RECONSTRUCTION_FILE)
        return {"reconstruction": figures}
    if isinstance(run.model, ClipModel):
        return clip_figures(run, split=split, limit=limit)
    model = run.model
    results: dict = {}
    for task in model.tasks:
        if task not in TASKS or TASKS[task][1] is not Modality.TEXT:
            continue
        results[task] = caption_accuracy(
            model,
            dataset,
            run.collator,
            run.tokenizer,
            TASKS[task][0],
            heldout_labels=run.data.heldout_labels,
            parse_label=run.data.parse_label,
            max_new_tokens=run.config.data.max_text_tokens,
            device=device,
            limit=limit,
        )
    if model.pairs:
        modalities = [Modality(key) for key in model.embed_heads]
        embedded = embed_dataset(model, dataset, run.collator, modalities, device=device, limit=limit)
        for name, recall in retrieval_figures(embedded).items():
            results[f"retrieval_{name}"] = recall
    if generate and {"text_to_image", "text_to_audio"} & set(model.tasks):
        results.update(_generation_figures(run, dataset, limit=limit, device=device))
    return results


def _generation_figures(run: Run, dataset, *, limit: int | None, device: torch.device) -> dict:
    """Probe-judged text -> image and text -> audio, the tokenizer's PSNR; samples into ``samples/``."""
    model, data = run.model, run.config.data
    judges = load_judges(data, run.config.seed, run.data.train, run.data.test, run.collator)
    common = dict(heldout_labels=run.data.heldout_labels, device=device, limit=limit)
    results: dict = {}
    images = speech = None
    if "text_to_image" in model.tasks:
        figures, images = text_to_image_figures(model, dataset, run.collator, judges.image, run.tokenizer.decode, **common)
        results["text_to_image"] = {**figures, "judge_accuracy_on_real_test": judges.image_accuracy}
        tokenizer_figures, _ = reconstruction_figures(model.image_tokenizer, dataset, run.collator, device=device)
        # The ceiling of text -> image: how often the judge reads the number in a REAL image after
        # the VQ-VAE's round trip.
        tokenizer_figures["probe_correct_reconstructed"] = reconstructed_probe_accuracy(
            model.image_tokenizer, judges.image, dataset, run.collator, device=device, limit=limit
        )
        # The ceiling of what text -> image learns: the reference drawing of each test number.
        asked = set(images.labels.tolist())  # the numbers text -> image was just asked for
        references = reference_images(asked, run.data.glyphs, height=data.image_height, width=data.image_width)
        results["text_to_image"]["judge_accuracy_on_reference_round_trip"] = reference_round_trip_accuracy(
            model.image_tokenizer, judges.image, references, device=device
        )
        results["image_tokenizer"] = tokenizer_figures
    if "text_to_audio" in model.tasks:
        vocoder = vocoder_for(data)
        speech_common = {**common, "limit": min(limit or SPEECH_EVAL_ITEMS, SPEECH_EVAL_ITEMS)}
        figures, speech = text_to_audio_figures(
            model, dataset, run.collator, judges.audio, vocoder, run.collator.log_mel, run.tokenizer.decode, **speech_common
        )
        results["text_to_audio"] = {**figures, "judge_accuracy_on_real_test": judges.audio_accuracy}
    write_samples(run.run_dir / SAMPLES_DIR, images, speech, sample_rate=data.sample_rate)
    return results


def flat_figures(results: dict) -> dict[str, float]:
    """``{"image_to_text": {"exact": .9}}`` -> ``{"image_to_text/exact": .9}`` (numbers only)."""
    return {
        f"{task}/{key}": float(value)
        for task, figures in results.items()
        for key, value in figures.items()
        if isinstance(value, (int, float))
    }


def train(config: Config, *, resume: bool = False) -> Path:
    """Train (or resume) the run ``config.run_dir`` and evaluate it; returns the run folder."""
    with RunLock(config.run_dir):  # one training process per run folder; a second one fails at once
        return _train(config, resume=resume)


def _train(config: Config, *, resume: bool) -> Path:
    check_model_config(config)  # a bad part spec fails before either stage starts
    run_dir = Path(config.run_dir)
    stage_dir = run_dir / TOKENIZER_STAGE_DIR if needs_tokenizer_stage(config) else None
    started_before = latest_checkpoint(run_dir) is not None or (stage_dir is not None and latest_checkpoint(stage_dir) is not None)
    if resume and not started_before:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from; start it without --resume")
    if not resume and started_before:
        raise ConfigError(
            f"{run_dir} already holds a run; continue it with --resume, or pick another folder with run_dir=..."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    if stage_dir is not None and not (stage_dir / EVAL_FILE).is_file():  # stage 1: the VQ-VAE (or its rest)
        logger.info("stage 1 of 2: the image tokenizer, in %s", stage_dir)
        train(tokenizer_stage_config(config), resume=latest_checkpoint(stage_dir) is not None)
        logger.info("stage 2 of 2: the any-to-any model, in %s", run_dir)
    resume = latest_checkpoint(run_dir) is not None
    torch.manual_seed(config.seed)  # model initialisation is part of the seeded run
    run = prepare(config, run_dir=run_dir, train_tokenizer=not resume)
    if stage_dir is not None and not resume:  # the trained VQ-VAE, frozen inside the model from now on
        load_checkpoint(latest_checkpoint(stage_dir), model=ImageTokenizerModel(run.model.image_tokenizer))
    logger.info(
        "model: %.2fM parameters; train %d / val %d / test %d samples",
        sum(p.numel() for p in run.model.parameters()) / 1e6,
        len(run.data.train),
        len(run.data.val),
        len(run.data.test),
    )

    def periodic_eval(model: nn.Module, step: int) -> dict[str, float]:
        return flat_figures(evaluate_run(run, split="val", limit=PERIODIC_EVAL_ITEMS, generate=False))

    started = time.perf_counter()
    result = fit(run.model, run.data.train, run.collator, config, run_dir, resume=resume, evaluate=periodic_eval)
    figures = evaluate_run(run, split="test")
    figures["train"] = {k: v for k, v in dataclasses.asdict(result).items() if isinstance(v, (int, float))}
    write_eval(run_dir, figures, config)
    _log_final(run_dir, figures, step=result.step)
    logger.info("trained and evaluated in %.0f s; figures in %s", time.perf_counter() - started, run_dir / EVAL_FILE)
    return run_dir


def needs_tokenizer_stage(config: Config) -> bool:
    """Whether the run trains an image tokenizer first (any-to-any with text_to_image)."""
    return config.model.architecture == "any_to_any" and "text_to_image" in config.model.tasks


def tokenizer_stage_config(config: Config) -> Config:
    """Stage 1 of a run with text_to_image: ``model.image_tokenizer`` under ``tokenizer_train``, in
    the run's ``image_tokenizer/`` subfolder, on the same data and seed."""
    model = dataclasses.replace(config.model, architecture="image_tokenizer")
    return dataclasses.replace(
        config, run_dir=str(Path(config.run_dir) / TOKENIZER_STAGE_DIR), model=model, train=config.tokenizer_train
    )


def _log_final(run_dir: Path, figures: dict, *, step: int) -> None:
    """Test-split figures (and the reconstruction grid, if any) into TensorBoard beside training."""
    with SummaryWriter(run_dir / TENSORBOARD_DIR) as writer:
        for key, value in flat_figures(figures).items():
            writer.add_scalar(f"test/{key}", value, step)
        grid = run_dir / RECONSTRUCTION_FILE
        if grid.is_file():
            writer.add_image("test/reconstructions", np.asarray(Image.open(grid)), step, dataformats="HWC")


def write_eval(run_dir: Path, figures: dict, config: Config) -> Path:
    path = run_dir / EVAL_FILE
    path.write_text(json.dumps({"figures": figures, "config": to_dict(config)}, indent=2))
    return path


def load_run(run_dir: Path, config: Config) -> Run:
    """Rebuild a trained run from its folder: tokenizer, model and the latest checkpoint's weights."""
    run = prepare(config, run_dir=run_dir, train_tokenizer=False)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"{run_dir} has no checkpoint; train it first with `polymodal train run_dir={run_dir}`")
    load_checkpoint(checkpoint, model=run.model)
    return run
