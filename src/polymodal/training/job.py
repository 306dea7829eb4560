"""A whole training job: its stages in order (the image tokenizer first when a head decodes with
one, then the model), each trained, evaluated on the test split and logged; resumable at any point.

A run folder holds everything needed to reproduce and use the run: ``config.yaml`` (resolved),
``tokenizer.json``, ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``eval.json`` and, for
a two-stage run, the first stage's own folder ``image_tokenizer/``.

In a data-parallel run every rank runs this job; rank 0 alone holds the folder's lock, writes the
tokenizer, the logs, the checkpoints and ``eval.json``; every rank evaluates its share of the
split's batches and rank 0 writes the figures of them all; the other ranks read what it wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from polymodal.config import Config, dump_config
from polymodal.data.augment import AugmentSettings
from polymodal.data.keyed import TrainingItems, load_noise_clips
from polymodal.diagnostics.live_hook import live_diagnostics
from polymodal.distributed.fsdp import check_sharding, export_whole, gathered, is_sharded
from polymodal.distributed.process import barrier, is_main
from polymodal.errors import ConfigError
from polymodal.evaluation.run import EVAL_FILE, RECONSTRUCTION_FILE, evaluate_run, flat_figures, write_eval
from polymodal.models.architectures import ARCHITECTURES
from polymodal.models.image_tokenizer import ImageTokenizerModel
from polymodal.training.checkpoint import latest_checkpoint, load_checkpoint
from polymodal.training.compile import check_compiler
from polymodal.training.loop import fit
from polymodal.training.step_record import FitResult
from polymodal.training.features import attach_feature_caches
from polymodal.training.metrics_log import TENSORBOARD_DIR
from polymodal.training.run import Run, prepare_run
from polymodal.training.run_lock import RunLock
from polymodal.training.schedules import restore_progress
from polymodal.training.selection import Selection, best_dir, read_best

logger = logging.getLogger(__name__)

# The first stage of a run whose head decodes with an image tokenizer: trained in this subfolder.
TOKENIZER_STAGE_DIR = "image_tokenizer"
# Items scored by the periodic (in-training) evaluation: enough for a trend, cheap enough to repeat.
PERIODIC_EVAL_ITEMS = 256


@dataclasses.dataclass(frozen=True)
class Stage:
    """One model trained in its own folder with its own config."""

    name: str
    config: Config

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


def plan_stages(config: Config) -> list[Stage]:
    """The run's stages in order: ``model.image_tokenizer`` under ``tokenizer_train`` in the run's
    ``image_tokenizer/`` subfolder (on the same data and seed, not augmented) when the model decodes
    with one, then the model itself.

    ``data.augment`` is for the model: the tokenizer's codes are text->image's targets, and warped
    training images cost it fidelity on the real ones (the `default` preset with affine and elastic
    warps: test PSNR 22.06 -> 21.90 dB, its reconstructed reference images judged 94.6% -> 90.3%).
    """
    stages = []
    if ARCHITECTURES.get(config.model.architecture).needs_image_tokenizer(config):
        model = dataclasses.replace(config.model, architecture="image_tokenizer", init_from=None)  # the model stage's
        data = dataclasses.replace(config.data, augment=AugmentSettings())
        tokenizer_dir = str(Path(config.run_dir) / TOKENIZER_STAGE_DIR)
        stage = dataclasses.replace(config, run_dir=tokenizer_dir, data=data, model=model, train=config.tokenizer_train)
        stages.append(Stage("image tokenizer", stage))
    return [*stages, Stage(config.model.architecture.replace("_", "-") + " model", config)]


def train(config: Config, *, resume: bool = False) -> Path:
    """Train (or resume) the run ``config.run_dir`` stage by stage and evaluate it; returns its folder."""
    # One training job per run folder (its rank 0 holds the lock); a second one fails at once.
    with RunLock(config.run_dir) if is_main() else contextlib.nullcontext():
        return _train_stages(config, resume=resume)


def _train_stages(config: Config, *, resume: bool) -> Path:
    stages = plan_stages(config)
    for stage in stages:  # before any stage trains: a clash found at the last stage would waste the first
        check_sharding(stage.config.train)
        check_compiler(stage.config.train, stage.config.device)
    started_before = any(latest_checkpoint(stage.run_dir) is not None for stage in stages)
    if resume and not started_before:
        raise ConfigError(f"--resume: {config.run_dir} has no checkpoint to resume from; start it without --resume")
    if not resume and started_before:
        raise ConfigError(f"{config.run_dir} already holds a run; continue it with --resume, or pick another folder with run_dir=...")
    if not resume and is_main():  # the whole job's config first, so `--resume` finds it whichever stage is stopped
        Path(config.run_dir).mkdir(parents=True, exist_ok=True)
        dump_config(config, Path(config.run_dir) / "config.yaml")
    previous = None
    for number, stage in enumerate(stages, start=1):
        done = stage is not stages[-1] and (stage.run_dir / EVAL_FILE).is_file()
        if not done:
            logger.info("stage %d of %d: the %s, in %s", number, len(stages), stage.name, stage.run_dir)
            train_stage(stage, previous)
        previous = stage
    return Path(config.run_dir)


def train_stage(stage: Stage, previous: Stage | None) -> None:
    """Fit one stage (resuming from its latest checkpoint if it has one), then evaluate it on the
    test split into ``eval.json`` and TensorBoard. A fresh model stage starts from the previous
    stage's trained image tokenizer, frozen inside it."""
    config, run_dir = stage.config, stage.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = latest_checkpoint(run_dir) is not None
    run = prepare_stage_run(config, run_dir, resume=resume)
    if previous is not None and not resume:
        load_checkpoint(latest_checkpoint(previous.run_dir), model=ImageTokenizerModel(run.model.image_tokenizer))
    splits = run.splits
    logger.info(
        "model: %.2fM parameters; train %d / val %d / test %d samples",
        sum(p.numel() for p in run.model.parameters()) / 1e6, len(splits.train), len(splits.val), len(splits.test),
    )

    selection = Selection(config.train, run_dir)

    def periodic_eval(model: nn.Module, step: int) -> dict[str, float]:
        figures = flat_figures(evaluate_run(run, split="val", limit=PERIODIC_EVAL_ITEMS, generate=False))
        if is_main():  # the best checkpoint is rank 0's to write
            selection.observe(model, step, figures)
        return figures

    items = TrainingItems(
        splits.train, augment=config.data.augment, seed=config.seed, sample_rate=config.data.sample_rate,
        noise_clips=load_noise_clips(config.data),
    )  # fmt: skip
    attach_feature_caches(run.model, config)
    started = time.perf_counter()
    diagnose = live_diagnostics(run, config.train)  # None unless train.diagnostics.every > 0
    result = fit(
        run.model, items, run.collator, config, run_dir, resume=resume, evaluate=periodic_eval, diagnose=diagnose,
        should_stop=selection.should_stop,
    )  # fmt: skip
    if is_sharded(run.model):  # FSDP: the whole model, once, for inference in one process
        export_whole(run.model, latest_checkpoint(run_dir))
    with gathered(run.model):  # FSDP: whole on every rank while the ranks evaluate
        test_figures(run, result, started)
    barrier()  # the next stage reads this one's eval.json


def test_figures(run: Run, result: FitResult, started: float) -> None:
    """The stage's test-split figures (those of the selected checkpoint with ``train.select``) into
    ``eval.json`` and TensorBoard. Every rank evaluates its share; rank 0 writes."""
    config, run_dir = run.config, run.run_dir
    best = read_best(run_dir) if config.train.select is not None else None
    if best is not None:  # the test figures are the selected checkpoint's
        restore_progress(run.model, load_checkpoint(best_dir(run_dir), model=run.model).get("step"), config.train.steps)
    figures = evaluate_run(run, split="test")
    if not is_main():
        return
    figures["train"] = {k: v for k, v in dataclasses.asdict(result).items() if isinstance(v, (int, float))}
    if best is not None:
        figures["selected"] = best
    write_eval(run_dir, figures, config)
    log_final(run_dir, figures, step=result.step)
    logger.info("trained and evaluated in %.0f s; figures in %s", time.perf_counter() - started, run_dir / EVAL_FILE)


def prepare_stage_run(config: Config, run_dir: Path, *, resume: bool) -> Run:
    """The stage's run, seeded (model initialisation is part of the seeded run). In a data-parallel
    run rank 0 prepares it first and trains the text tokenizer; the others then load that tokenizer."""
    if is_main():
        torch.manual_seed(config.seed)
        run = prepare_run(config, run_dir, resume=resume)
    barrier()
    if not is_main():
        torch.manual_seed(config.seed)
        run = prepare_run(config, run_dir, resume=True)  # resume=True: the tokenizer from rank 0's file
    return run


def log_final(run_dir: Path, figures: dict, *, step: int) -> None:
    """Test-split figures (and the reconstruction grid, if any) into TensorBoard beside training."""
    with SummaryWriter(run_dir / TENSORBOARD_DIR) as writer:
        for key, value in flat_figures(figures).items():
            writer.add_scalar(f"test/{key}", value, step)
        grid = run_dir / RECONSTRUCTION_FILE
        if grid.is_file():
            writer.add_image("test/reconstructions", np.asarray(Image.open(grid)), step, dataformats="HWC")
