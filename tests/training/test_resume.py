"""Exact resume: the data order replays from any item, metrics are not duplicated, and a run killed
with SIGKILL mid-way and resumed ends with bitwise the same weights as an uninterrupted run; with
augmentation on as well."""

import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from polymodal.config import load_config
from polymodal.data.batch import Sample
from polymodal.data.collate import build_collator
from polymodal.data.keyed import TrainingItems
from polymodal.data.text import TextTokenizer
from polymodal.models.architectures import build_model
from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.loop import fit
from polymodal.training.run import data_shapes
from polymodal.training.metrics_log import MetricsLogger
from polymodal.training.sampler import EpochSampler, build_loader

sys.path.insert(0, str(Path(__file__).parent))  # resume_job.py beside this file
from resume_job import STEPS, assert_same_weights, logged_entries, logged_steps, signal_when, start  # noqa: E402


def _indices(sampler: EpochSampler, count: int) -> list[int]:
    stream = iter(sampler)
    return [next(stream) for _ in range(count)]


def test_sampler_epochs_are_seeded_permutations():
    stream = _indices(EpochSampler(7, seed=4), 21)
    for epoch in range(3):
        expected = torch.randperm(7, generator=torch.Generator().manual_seed(4 + epoch)).tolist()
        assert stream[7 * epoch : 7 * (epoch + 1)] == expected
    assert stream[:7] != stream[7:14]  # each epoch reshuffles


def test_sampler_resumes_at_any_item():
    full = _indices(EpochSampler(10, seed=1), 35)
    for first in (0, 3, 10, 17, 29):
        assert _indices(EpochSampler(10, seed=1, start=first), 35 - first) == full[first:]


def test_loader_resumed_at_item_k_yields_the_remaining_batches():
    data = torch.arange(13)
    collate = torch.stack
    full = [b for _, b in zip(range(9), build_loader(data, collate, batch_size=4, seed=2))]
    resumed = [b for _, b in zip(range(6), build_loader(data, collate, batch_size=4, seed=2, start=12))]
    for a, b in zip(full[3:], resumed):
        assert torch.equal(a, b)


def test_loader_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(build_loader(torch.arange(5), torch.stack, batch_size=2, seed=0)))
    assert torch.equal(torch.rand(3), expected)


def test_metrics_logger_drops_entries_after_the_resumed_step(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 11):
            logger.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 11, "spl')  # torn by a kill
    with MetricsLogger(tmp_path, resume_step=5) as logger:
        logger.log(6, {"loss": 0.5})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    with MetricsLogger(tmp_path) as logger:  # a fresh run starts a fresh log
        logger.log(1, {"loss": 2.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def _finish(proc, run_dir: Path) -> None:
    assert proc.wait(timeout=120) == 0, (run_dir.parent / f"{run_dir.name}.log").read_text()


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step_"))


def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(tmp_path):
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"
    whole = start(whole_dir)
    killed = start(killed_dir, "--step-delay", "0.05")

    # Kill once a checkpoint exists and a later step was logged, so resume must also drop that entry.
    def ready() -> bool:
        reached = latest_checkpoint(killed_dir)
        return reached is not None and max(logged_steps(killed_dir), default=0) > _step_of(reached)

    signal_when(killed, signal.SIGKILL, ready)
    assert killed.wait(timeout=30) == -signal.SIGKILL, "the job finished before it could be killed"
    reached = latest_checkpoint(killed_dir)
    assert reached is not None and reached.name != f"step_{STEPS:07d}"

    _finish(start(killed_dir, "--resume"), killed_dir)
    _finish(whole, whole_dir)

    assert_same_weights(killed_dir, whole_dir, STEPS)
    # Every logged figure (losses, lr, grad norm, the RNG-drawing evaluation) matches, each step once.
    assert logged_entries(killed_dir) == logged_entries(whole_dir)


def test_resume_with_augmentation_matches_the_uninterrupted_run_bitwise(tmp_path):
    """The audio chain, SpecAugment and dropout on, items loaded in a worker process: a run resumed
    from its middle checkpoint ends with the uninterrupted run's weights, bitwise (an augmentation
    drawn from a worker's own RNG would not replay: the resumed loader seeds its workers anew)."""
    augment = [
        "data.augment.audio.speed_p=1.0", "data.augment.audio.noise_p=1.0", "data.augment.audio.reverb_p=0.5",
        "data.augment.audio.gain_p=1.0", "data.augment.audio.spec_augment_p=1.0", "data.augment.audio.time_mask_width=5",
    ]  # fmt: skip
    settings = [
        "model.tasks=[audio_to_text]", "model.backbone.dropout=0.1", "train.steps=8", "train.ckpt_every=4",
        "train.batch_size=4", "train.keep_checkpoints=0", "train.progress=false", "train.precision=fp32",
        "device=cpu", "data.num_workers=1", "seed=5", "train.prefetch=0",
    ]  # fmt: skip
    config = load_config(["tiny"], [*augment, *settings])
    rng = np.random.default_rng(0)
    words = ["one", "two", "three", "four", "five"]
    clips = [
        Sample(text=words[i % 5], audio=torch.from_numpy((0.3 * rng.standard_normal(3000 + 200 * i)).astype(np.float32)), label=i % 5)
        for i in range(10)
    ]
    tokenizer = TextTokenizer.train(words * 3, vocab_size=300)
    collator = build_collator(tokenizer, config.data, seed=config.seed)

    def train(run_dir: Path, *, resume: bool) -> None:
        torch.manual_seed(0)
        model = build_model(config, data_shapes(config, tokenizer, collator))
        items = TrainingItems(clips, augment=config.data.augment, seed=config.seed, sample_rate=config.data.sample_rate)
        fit(model, items, collator, config, run_dir, resume=resume)

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole, resume=False)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    train(resumed, resume=True)
    assert_same_weights(resumed, whole, 8)
