"""Benchmark: train the image and speech probes (the judges of generated samples) on the built-in
data and print their accuracy on held-out real items, with the time each took to train.

Claim (issue 4): a probe reads the number of a real held-out image with >= 95% accuracy and of real
held-out speech with >= 90%, and trains in well under a minute on 2 CPU cores.

Rows:
  * image, train+val -> test: the recommended judge (see ``polymodal/datasets/spoken_numbers/probes.py``): the
    test split's handwriting and voices are never seen in training;
  * image, test 80% -> test 20%: the issue's literal set-up (a probe trained on test-split images),
    scored on a seeded fifth of the test split that it did not train on; that fifth shares its
    handwriting (the test split draws its digits from 500 MNIST images) with the other four;
  * audio, train+val -> test.
Times are wall and CPU seconds (this process, ``time.process_time``) of ``fit_*`` (training plus
scoring), with the 1-minute load average before and after, since the machine is shared.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/train_probes.py                     # 20,000 samples, seed 0
    OMP_NUM_THREADS=1 python benchmarks/train_probes.py --num-samples 2000  # a quick look
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from torch.utils.data import ConcatDataset

from polymodal.config import DataConfig
from polymodal.data.collate import build_collator
from polymodal.data.text import TextTokenizer
from polymodal.datasets.spoken_numbers import probe_training as probes
from polymodal.datasets.spoken_numbers.source import SpokenNumbersSource

TEST_HOLDOUT = 0.2  # the set-up: train on 80% of the test split, score on the other 20%


def _timed(fit, *args, **kwargs) -> tuple[float, float, float, str]:
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    _, accuracy = fit(*args, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return accuracy, wall, cpu, f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-steps", type=int, default=1200)
    parser.add_argument("--audio-steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-literal", action="store_true", help="leave out the test 80/20 image row")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = DataConfig()
    data = SpokenNumbersSource(config, args.seed, num_samples=args.num_samples).load()
    collator = build_collator(TextTokenizer.train(data.train_texts, vocab_size=config.vocab_size), config)
    train_val = ConcatDataset([data.train, data.val])
    settings = dict(batch_size=args.batch_size, seed=args.seed)

    rows = []
    accuracy, wall, cpu, load = _timed(
        probes.fit_image_probe, train_val, data.test, collator, steps=args.image_steps, **settings
    )
    rows.append(("image", "train+val", len(train_val), "test", len(data.test), args.image_steps, accuracy, wall, cpu, load))
    if not args.skip_literal:
        kept, held = probes.split_dataset(data.test, holdout_fraction=TEST_HOLDOUT, seed=args.seed)
        accuracy, wall, cpu, load = _timed(probes.fit_image_probe, kept, held, collator, steps=args.image_steps, **settings)
        rows.append(("image", "test 80%", len(kept), "test 20%", len(held), args.image_steps, accuracy, wall, cpu, load))
    accuracy, wall, cpu, load = _timed(
        probes.fit_audio_probe, train_val, data.test, collator, steps=args.audio_steps, **settings
    )
    rows.append(("audio", "train+val", len(train_val), "test", len(data.test), args.audio_steps, accuracy, wall, cpu, load))

    print(f"spoken numbers: {args.num_samples} samples, seed {args.seed}; torch threads {torch.get_num_threads()}")
    print("| probe | trained on | items | scored on | items | steps | accuracy | wall s | CPU s | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for probe, train_name, num_train, eval_name, num_eval, steps, accuracy, wall, cpu, load in rows:
        print(
            f"| {probe} | {train_name} | {num_train} | {eval_name} | {num_eval} | {steps} | {accuracy:.4f} "
            f"| {wall:.1f} | {cpu:.1f} | {load} |"
        )


if __name__ == "__main__":
    main()
