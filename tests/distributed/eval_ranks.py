"""The evaluation run as ranks by ``test_sharded_eval.py`` (and in one process, for the reference):
a tiny-preset run's figures, computed on every rank, and how many items each rank collated.

Here, not in the test file, because spawned ranks import it by module name.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from polymodal.config import load_config
from polymodal.distributed.process import rank
from polymodal.evaluation.captioning import caption_accuracy
from polymodal.evaluation.reconstruction import reconstruction_figures
from polymodal.evaluation.run import evaluate_run
from polymodal.evaluation.sharding import map_batches
from polymodal.evaluation.zero_shot import embed_dataset
from polymodal.modality import Modality
from polymodal.training.run import Run, prepare_run

SMALL_BATCH = 3  # several batches of the small test split, so that both ranks have some
LIMIT = 7  # items, not a multiple of SMALL_BATCH
OVERRIDES = ["data.options.num_samples=96", "device=cpu", "train.precision=fp32", "seed=5"]
WEIGHTS = "weights.safetensors"


def tiny_run(run_dir: Path, *, fresh: bool) -> Run:
    """The tiny preset's run in ``run_dir`` (``fresh``: trains its text tokenizer and writes its
    weights; else reads both)."""
    config = load_config(["tiny"], [f"run_dir={run_dir}", *OVERRIDES])
    torch.manual_seed(config.seed)
    run = prepare_run(config, run_dir, resume=not fresh)
    if fresh:
        safetensors.torch.save_model(run.model, str(run_dir / WEIGHTS))
    else:
        safetensors.torch.load_model(run.model, str(run_dir / WEIGHTS))
    return run


class CountingCollate:
    """The run's collator, counting the items it collates."""

    def __init__(self, collate) -> None:
        self.collate, self.items = collate, 0

    def __call__(self, rows):
        self.items += len(rows)
        return self.collate(rows)


def evaluate_here(run_dir: Path, out: Path) -> None:
    """The run's figures on the test split (as training's end computes them, without samples), and
    captioning, embedding and reconstruction at batch SMALL_BATCH, into ``out/rank{r}.pt``."""
    run = tiny_run(run_dir, fresh=False)
    model, test = run.model, run.splits.test
    figures = evaluate_run(run, split="test", generate=False)
    counting = CountingCollate(run.collator)
    common = dict(tokenizer=run.tokenizer, modality=Modality.IMAGE, parse_label=run.source.label_parser, batch_size=SMALL_BATCH)
    small = {
        "captions": caption_accuracy(model, test, counting, **common),
        "captions_limited": caption_accuracy(model, test, counting, limit=LIMIT, **common),
        "embedded": embed_dataset(model, test, counting, model.contrastive.modalities, batch_size=SMALL_BATCH),
        "embedded_limited": embed_dataset(model, test, counting, [Modality.AUDIO], batch_size=SMALL_BATCH, limit=LIMIT),
        "reconstruction": reconstruction_figures(model.image_tokenizer, test, counting, batch_size=SMALL_BATCH),
    }
    torch.save({"figures": figures, "small": small, "collated": counting.items, "num_test": len(test)}, out / f"rank{rank()}.pt")


def evaluate_with_samples(run_dir: Path, out: Path) -> None:
    """The figures training's end computes, samples included (the built-in judges replaced by none:
    they train on rank 0 alone and are not what is shared out), on at most LIMIT test items, into
    ``out/samples{r}.pt``."""
    run = tiny_run(run_dir, fresh=False)
    run.source.evaluate_generation = lambda *args, **kwargs: {}
    figures = evaluate_run(run, split="test", limit=LIMIT, generate=True)
    torch.save(figures, out / f"samples{rank()}.pt")


def map_numbers(num_items: int, batch_size: int, stop_at: int | None, out: Path) -> None:
    """``map_batches`` over the numbers 0..num_items-1: each batch's (its numbers, the rank that
    computed it), stopped once the numbers sum past ``stop_at``; into ``out/map{r}.pt``."""
    def enough(done: list) -> bool:
        return stop_at is not None and sum(sum(numbers) for numbers, _ in done) > stop_at

    done = map_batches(list(range(num_items)), list, lambda batch: (batch, rank()), batch_size=batch_size, enough=enough)
    torch.save(done, out / f"map{rank()}.pt")
