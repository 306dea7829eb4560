"""Where a run's text -> image samples go wrong: the judge's reading of images drawn from test
captions, exact by the asked number's digit count, and, where the judge reads as many digits as
were asked, right by digit place (issue 18: does a wrong number miss all of its digits, or the
later ones?). Built-in data only: the judge reads the spoken-numbers images. (Whatever a
caption's wording, the data's front end hands the image generator the number as digits, one token
each: ``Collator.source_texts``.)

Then, by seen or held-out number and digit count, the generated exact match beside its ceiling:
the judge's reading of each asked number's reference drawing as drawn, and after the run's image
tokenizer encodes and decodes it (a head that draws the reference's codes perfectly reads no
better than that round trip).

    python benchmarks/probe_image_digit_places.py RUN --limit 600
"""

from __future__ import annotations

import argparse
import collections

import torch

from polymodal.datasets.spoken_numbers import judges
from polymodal.datasets.spoken_numbers.generation_figures import reference_renderings
from polymodal.datasets.spoken_numbers.probe_training import predict_numbers
from polymodal.evaluation.samples import generate_from_captions
from polymodal.modality import Modality
from polymodal.training.run import load_run


def tally(asked: list[int], read: list[int]) -> tuple[dict, dict, dict]:
    """(exact, length right, digit right by (length, place)) as {key: [right, total]}."""
    exact, length, place = (collections.defaultdict(lambda: [0, 0]) for _ in range(3))
    for wanted, got in zip(map(str, asked), map(str, read)):
        exact[len(wanted)][0] += wanted == got
        length[len(wanted)][0] += len(wanted) == len(got)
        exact[len(wanted)][1] += 1
        length[len(wanted)][1] += 1
        if len(wanted) == len(got):
            for i, (a, b) in enumerate(zip(wanted, got)):
                place[(len(wanted), i)][0] += a == b
                place[(len(wanted), i)][1] += 1
    return exact, length, place


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--limit", type=int, default=600, help="test captions drawn from (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    run = load_run(args.run_dir)
    run.model.eval()
    source, collator, test = run.source, run.collator.log_mel_view(), run.splits.test
    found = source.load_judges(run.splits, collator)
    torch.manual_seed(args.seed)
    device = next(run.model.parameters()).device
    samples = generate_from_captions(run, test, Modality.IMAGE, limit=args.limit, device=device, repeats=1)
    read = judges.read_images(found.image, samples.images)
    asked, read = samples.labels.tolist(), read.tolist()
    report(*tally(asked, read))
    if run.model.image_tokenizer is not None:
        report_ceiling(run, found.image, asked, read)


@torch.no_grad()
def report_ceiling(run, judge, asked: list[int], read: list[int]) -> None:
    """Per (held-out?, digit count): numbers, the reference drawing read as drawn and after the
    tokenizer's round trip (share of numbers), and the generated images read right (mean per number)."""
    numbers = sorted(set(asked))
    images = reference_renderings(run.source.reference_images(set(numbers)), torch.tensor(numbers))
    as_drawn = predict_numbers(judge, images).tolist()
    round_trip = predict_numbers(judge, run.model.image_tokenizer.reconstruct(images).clamp(-1, 1)).tolist()
    generated = collections.defaultdict(list)
    for wanted, got in zip(asked, read):
        generated[wanted].append(wanted == got)
    rows = collections.defaultdict(lambda: [0, 0, 0, 0.0])
    for number, drawn, trip in zip(numbers, as_drawn, round_trip):
        row = rows[(number in run.splits.heldout_labels, len(str(number)))]
        row[0] += 1
        row[1] += drawn == number
        row[2] += trip == number
        row[3] += sum(generated[number]) / len(generated[number])
    print("numbers | digits | count | reference as drawn | after the tokenizer's round trip | generated")
    for (heldout, digits), (count, drawn, trip, right) in sorted(rows.items()):
        kind = "held-out" if heldout else "seen"
        print(f"  {kind:8s} | {digits} | {count:4d} | {drawn / count:6.1%} | {trip / count:6.1%} | {right / count:6.1%}")


def report(exact: dict, length: dict, place: dict) -> None:
    for digits in sorted(exact):
        places = ", ".join(f"{place[(digits, i)][0] / max(place[(digits, i)][1], 1):.1%}" for i in range(digits))
        print(
            f"  {digits} digit(s), {exact[digits][1]} captions: exact {exact[digits][0] / exact[digits][1]:.1%}, "
            f"length read right {length[digits][0] / length[digits][1]:.1%}, digit right by place (first on) {places}"
        )

if __name__ == "__main__":
    main()
