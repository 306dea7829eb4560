"""Where a built-in run's image->text captions go wrong, by the MNIST test image each digit came from
(issue 14: is the 95% image->text line a matter of training, or of the test digits?).

The built-in test split draws every digit of every number from a pool of about 500 MNIST test
images (10% of each class, ``datasets/spoken_numbers/build.py``), so each image is read in about
eight numbers. For each test item the greedy caption is read back as a number and compared digit by
digit (a wrong digit count makes every digit of the item wrong). The script then prints:

- how many of the pool's images are read wrong in at least half (and 80%) of their uses, and what
  share of the wrong uses they make: images the model misreads whatever surrounds them;
- the share of numbers whose every digit image is read right in most of its uses: what image->text
  would read if each image were always read the way it usually is;
- the digit confusions, most frequent first.

The number and the pool are the built-in data's, so this runs on built-in runs only. ``--split
train --items 1024`` reads the first training items instead (their digits come from the 4,000
training images): the gap between the two splits is what the reader has memorised.

    python benchmarks/probe_caption_errors.py runs/default
    python benchmarks/probe_caption_errors.py runs/default --split train --items 1024
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from polymodal.datasets.spoken_numbers.numbers import parse_number
from polymodal.modality import Modality
from polymodal.training.run import load_run


@torch.no_grad()
def digit_reads(run, split, items: int | None = None, batch_size: int = 128) -> list[tuple[int, str, str | None]]:
    """(item, asked number, number read or None) for the first ``items`` items of ``split`` (None: every one)."""
    model = run.model.eval()
    count = len(split) if items is None else min(items, len(split))
    reads = []
    for start in range(0, count, batch_size):
        rows = range(start, min(start + batch_size, count))
        batch = run.collator([split[i] for i in rows])
        captions = model.generate(Modality.IMAGE, Modality.TEXT, batch.inputs[Modality.IMAGE], None, max_new_tokens=24)
        for i, ids in zip(rows, captions):
            number = parse_number(run.tokenizer.decode(ids))
            asked = str(int(split.data.labels[split.indices[i]]))
            reads.append((i, asked, None if number is None else str(number)))
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--items", type=int, default=None, help="read the split's first N items (default: every one)")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    split = getattr(run.splits, args.split)
    uses, wrong, confusions = Counter(), Counter(), Counter()
    sources_of = {}
    reads = digit_reads(run, split, args.items)
    for i, asked, read in reads:
        sources = [int(s) for s in split.data.digit_sources[split.indices[i]][: len(asked)]]
        sources_of[i] = sources
        same_length = read is not None and len(read) == len(asked)
        for j, source in enumerate(sources):
            uses[source] += 1
            if not same_length or read[j] != asked[j]:
                wrong[source] += 1
                if same_length:
                    confusions[(asked[j], read[j])] += 1
    exact = sum(asked == read for _, asked, read in reads) / len(reads)
    print(f"{args.run_dir}: image->text exact {exact:.1%} over {len(reads)} {args.split} items")
    print(f"{args.split} digit images used: {len(uses)}; digit reads {sum(uses.values())}, wrong {sum(wrong.values())} "
          f"({sum(wrong.values()) / sum(uses.values()):.1%})")  # fmt: skip
    rate = {source: wrong[source] / uses[source] for source in uses}
    for threshold in (0.5, 0.8):
        hard = [s for s, r in rate.items() if r >= threshold]
        print(f"images read wrong in >= {threshold:.0%} of their uses: {len(hard)} ({len(hard) / len(uses):.1%}), "
              f"{sum(wrong[s] for s in hard)} of the wrong reads")  # fmt: skip
    usual = sum(all(rate[s] < 0.5 for s in sources) for sources in sources_of.values()) / len(sources_of)
    print(f"numbers whose every digit image is read right in most of its uses: {usual:.1%}")
    print("confusions (asked -> read): " + ", ".join(f"{a}->{b} {n}" for (a, b), n in confusions.most_common(10)))


if __name__ == "__main__":
    main()
