"""Caption exact match of a trained run under beam search, against greedy decoding, in one process
(issue 14: does the text head's decoding, not its training, cost image->text points?).

For each beam count the run's text head decodes the whole split (``model.heads.text.num_beams``, as
``polymodal eval`` would with that setting in the run's config) and the script prints exact match,
held-out-number exact match and the decoding time of every X -> text task the run trains. Beam
search keeps the K likeliest captions at each step, scored by their summed log-probability
(``heads/text.py``); 1 is greedy.

    python benchmarks/probe_beam_search.py runs/default --beams 1 2 4 8
"""

from __future__ import annotations

import argparse
import time

import torch

from polymodal.evaluation.captioning import caption_accuracy
from polymodal.modality import Modality
from polymodal.training.run import load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--split", choices=("val", "test"), default="test")
    args = parser.parse_args()
    run = load_run(args.run_dir)
    head = run.model.head(Modality.TEXT)
    split = getattr(run.splits, args.split)
    sources = [m for m in (Modality.IMAGE, Modality.AUDIO) if f"{m.value}_to_text" in run.config.model.tasks]
    print(f"{args.run_dir}, {args.split} split ({len(split)} items)")
    print("| beams | " + " | ".join(f"{m.value}->text (held-out) | decode s" for m in sources) + " |")
    print("| ---: |" + " ---: | ---: |" * len(sources))
    for beams in args.beams:
        head.num_beams = beams
        cells = []
        for source in sources:
            start = time.perf_counter()
            with torch.no_grad():
                figures = caption_accuracy(
                    run.model, split, run.collator, run.tokenizer, source, heldout_labels=run.splits.heldout_labels,
                    parse_label=run.source.label_parser, max_new_tokens=run.config.data.max_text_tokens,
                )
            seconds = time.perf_counter() - start
            held = f" ({figures['heldout_exact']:.2%})" if "heldout_exact" in figures else ""
            cells.append(f"{figures['exact']:.2%}{held} | {seconds:.1f}")
        print(f"| {beams} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
