"""How well the `default` preset's image encoder and backbone can read digits when told each digit
directly, instead of through a caption (issue 14: image->text >= 95%).

The main job's image->text misreads 4-5% of the test digits after 800 steps ("What image->text reads
wrong", BENCHMARKS.md). This probe trains the same parts, freshly initialised, with the same steps,
batch and learning-rate schedule, but supervised per digit, and prints what they reach on the
built-in test split. Two readers:

- ``slots``: the built-in images as they are (one to three digits). Three learned query tokens
  follow the image's tokens through the preset's backbone (one bidirectional source pass); query k
  classifies the number's k-th digit, or "no digit" past its end. Nothing is read through words,
  templates or an autoregressive decoder. Its exact match is the image->text figure a reader of
  these images would reach if reading through captions cost nothing.
- ``single``: one digit per image, drawn by the built-in data's own drawing (``draw_digits``) from
  the training items' digit images, on the same 32 x 96 canvas; one query classifies it. A fresh
  layout each time. The test images are the test items' digits, drawn once. Its error is what the
  same parts reach on digits without neighbours.

``slots`` draws its training images through ``data.augment`` as ``fit`` does: the preset warps half
of them (``--set data.augment.image.affine_p=0 --set data.augment.image.elastic_p=0`` for none).

The reader autocasts as ``fit`` does (``train.precision``; ``auto`` is bf16 on a CPU that runs it
fast; ``--set train.precision=fp32`` for full precision). The image tokenizer, audio and text parts
are built with the model but unused. One run per reader and seed, on the current process's threads:

    python benchmarks/probe_reader_bounds.py --seeds 0 1
    python benchmarks/probe_reader_bounds.py --readers slots --set train.steps=1600
    python benchmarks/probe_reader_bounds.py --readers slots --set data.augment.image.affine_p=0 --set data.augment.image.elastic_p=0
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from polymodal.config import load_config
from polymodal.data.batch import ItemKey
from polymodal.data.image import normalize_images
from polymodal.data.keyed import TrainingItems
from polymodal.datasets.spoken_numbers.drawing import compose_chunk, draw_layouts
from polymodal.datasets.spoken_numbers.mnist import load_mnist
from polymodal.modality import Modality
from polymodal.training.optim import build_optimizer, build_scheduler
from polymodal.training.precision import autocast, resolve_precision
from polymodal.training.run import prepare_run

NO_DIGIT = 10  # the class of a query past the number's last digit


class QueryReader(nn.Module):
    """The preset's image encoder and backbone, then ``slots`` learned queries, each classified."""

    def __init__(self, model: nn.Module, slots: int) -> None:
        super().__init__()
        self.model = model
        dim = model.backbone.dim
        self.queries = nn.Parameter(torch.randn(1, slots, dim) * 0.02)
        self.classify = nn.Linear(dim, NO_DIGIT + 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, valid = self.model.encode(Modality.IMAGE, images)
        queries = self.queries.expand(len(tokens), -1, -1)
        states = self.model.source_states(
            torch.cat([tokens, queries], dim=1), torch.cat([valid, torch.ones(queries.shape[:2], dtype=torch.bool)], dim=1)
        )
        return self.classify(states[:, -queries.shape[1] :])  # (B, slots, 11)


def digits_of(number: int, slots: int) -> list[int]:
    digits = [int(c) for c in str(int(number))]
    return digits + [NO_DIGIT] * (slots - len(digits))


def single_digit_images(mnist_indices: np.ndarray, rng: np.random.Generator, height: int, width: int) -> torch.Tensor:
    """One MNIST digit per canvas, drawn as the built-in data draws its digits: (N, 1, H, W) in [-1, 1]."""
    canvases = compose_chunk((mnist_indices[:, None], draw_layouts(rng, len(mnist_indices), 1), height, width))
    return normalize_images(torch.from_numpy(canvases)[:, None].float() / 255.0)


def read(reader_name: str, config, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as run_dir:
        run = prepare_run(config, Path(run_dir), resume=False)
    splits, train = run.splits, config.train
    slots = 3 if reader_name == "slots" else 1
    reader = QueryReader(run.model, slots)
    optimizer = build_optimizer(reader, train)  # the preset's AdamW groups, lr and decay
    scheduler = build_scheduler(optimizer, train)  # and its warmup-cosine over train.steps

    # training items augmented as fit augments them (data.augment), drawn anew each step
    augmented = TrainingItems(splits.train, augment=config.data.augment, seed=seed, sample_rate=config.data.sample_rate)

    def labelled(split, rows, items) -> tuple[torch.Tensor, torch.Tensor]:
        """The images of ``items`` (rows ``rows`` of ``split``) and their numbers' digits."""
        numbers = [int(split.data.labels[split.indices[i]]) for i in rows]
        return run.collator(items).inputs[Modality.IMAGE], torch.tensor([digits_of(n, slots) for n in numbers])

    def sources(split) -> np.ndarray:  # the MNIST image of each item's first digit
        return np.array([int(split.data.digit_sources[split.indices[i]][0]) for i in range(len(split))])

    height, width = config.data.image_height, config.data.image_width
    _, mnist_labels = load_mnist()
    if reader_name == "single":
        train_pool, test_pool = sources(splits.train), sources(splits.test)
        test_images = single_digit_images(test_pool, np.random.default_rng(10_000 + seed), height, width)
        test_targets = torch.from_numpy(mnist_labels[test_pool])[:, None]
    device = torch.device("cpu")
    dtype = resolve_precision(train.precision, device)  # as fit autocasts (auto: bf16 where fast)
    start = time.perf_counter()
    reader.train()
    for step in range(train.steps):
        if reader_name == "single":
            picks = train_pool[rng.integers(0, len(train_pool), train.batch_size)]
            images = single_digit_images(picks, rng, height, width)
            targets = torch.from_numpy(mnist_labels[picks])[:, None]
        else:
            rows = rng.integers(0, len(splits.train), train.batch_size)
            images, targets = labelled(splits.train, rows, [augmented[ItemKey(step, int(i))] for i in rows])
        with autocast(device, dtype):
            logits = reader(images)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), train.grad_clip if train.grad_clip > 0 else math.inf)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    reader.eval()
    wrong = digits = exact = 0
    with torch.no_grad():
        for begin in range(0, len(splits.test), 256):
            rows = range(begin, min(begin + 256, len(splits.test)))
            if reader_name == "single":
                images, targets = test_images[begin : rows.stop], test_targets[begin : rows.stop]
            else:
                images, targets = labelled(splits.test, rows, [splits.test[i] for i in rows])
            with autocast(device, dtype):
                guess = reader(images).argmax(-1)
            real = targets != NO_DIGIT
            wrong += int(((guess != targets) & real).sum())
            digits += int(real.sum())
            exact += int((guess == targets).all(dim=1).sum())
    return {"digit_error": wrong / digits, "exact": exact / len(splits.test), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readers", nargs="+", choices=("slots", "single"), default=["slots", "single"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override of the default preset (train.steps=1600); repeatable")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("reader  seed  steps  test digit error  test exact  train s")
    for reader_name in args.readers:
        for seed in args.seeds:
            config = load_config(overrides=[f"seed={seed}", *args.set])
            out = read(reader_name, config, seed)
            print(f"{reader_name:6s}  {seed:4d}  {config.train.steps:5d}  {out['digit_error']:15.2%}  {out['exact']:10.2%}  {out['seconds']:7.0f}", flush=True)


if __name__ == "__main__":
    main()
