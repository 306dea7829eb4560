"""How well the built-in data's audio judge reads the voice that text->audio learns to speak.

Text->audio on the built-in data learns one reference voice (``references.reference_speech``), and
its samples are judged by an ``AudioProbe`` trained on the data's real training speech. A judge that
misreads the reference voice itself caps what text->audio can score, and the cap falls on a few
numbers: a generator speaks every caption of one number alike, so one misread number costs all its
test items. This script trains audio judges as ``judges.load_judges`` does, at each step count and
seed asked, and prints for each:

- its accuracy on the real test split's speech (what ``judge_accuracy_on_real_test`` reports);
- the share of the numbers 0-999 it reads right in the reference voice, as spoken and after the
  log-mel -> vocoder -> log-mel round trip that generated speech takes
  (``judges.read_reference_voice``, as ``judge_accuracy_on_reference_voice`` reports it for the
  asked numbers), with the numbers misread there.

    python benchmarks/probe_audio_judge.py runs/default --steps 600 1200 --seeds 0 1 2

The run gives the data settings and seed; its weights are not used.
"""

from __future__ import annotations

import argparse
import time

import torch

from polymodal.datasets.spoken_numbers.judges import JUDGE_BATCH, read_reference_voice
from polymodal.datasets.spoken_numbers.probe_training import fit_audio_probe, predict_numbers
from polymodal.datasets.spoken_numbers.references import reference_speech
from polymodal.evaluation.samples import vocoder_for
from polymodal.training.run import load_run

NUMBERS = range(1000)


@torch.no_grad()
def read_as_spoken(judge, references: dict, collate_fn) -> list[int]:
    """The numbers the judge reads wrong from the reference voice's own log-mel (no vocoder)."""
    wrong = []
    for n in sorted(references):
        audio = torch.from_numpy(references[n].value).float()[None]
        mels = collate_fn.log_mel(audio)
        mask = torch.ones(mels.shape[:2], dtype=torch.bool)
        if int(predict_numbers(judge, mels, mask)[0]) != n:
            wrong.append(n)
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a built-in run (its data settings and seed)")
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 1200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_run(args.run_dir)
    collate_fn = run.collator.log_mel_view()  # the judges read log-mel, whatever the model reads
    splits, data = run.splits, run.config.data
    references = reference_speech(NUMBERS, sample_rate=data.sample_rate)
    vocoder = vocoder_for(data)
    print(f"{args.run_dir}: {len(splits.train)} training items, reference voice for the numbers 0-999")
    print("steps  seed  real test  as spoken  after the vocoder  train s  misread after the vocoder")
    for steps in args.steps:
        for seed in args.seeds:
            start = time.perf_counter()
            judge, accuracy = fit_audio_probe(
                splits.train, splits.test, collate_fn, steps=steps, batch_size=JUDGE_BATCH, seed=seed, num_mels=data.num_mels
            )  # fmt: skip
            seconds = time.perf_counter() - start
            spoken = read_as_spoken(judge, references, collate_fn)
            read = read_reference_voice(judge, references, collate_fn, vocoder)
            wrong = [n for n, got in read.items() if got != n]
            print(
                f"{steps:5d} {seed:5d} {accuracy:10.1%} {1 - len(spoken) / len(references):10.1%} {1 - len(wrong) / len(read):18.1%} {seconds:8.0f}  "
                + " ".join(map(str, wrong)),
                flush=True,
            )


if __name__ == "__main__":
    main()
