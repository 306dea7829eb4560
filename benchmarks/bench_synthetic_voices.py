"""Which synthetic voices teach a model to read real people: espeak-ng alone, or espeak-ng and flite.

Claim (issue 12, "built-in speech that transfers"): a `speech`-preset model trained on synthetic
spoken digits only, none of them human, reads the real recordings of ``../shared/data/fsdd-dev``
(4 speakers, 2,000 clips) better when part of its synthetic speech comes from flite's voices
(``polymodal/datasets/spoken_numbers/flite.py``) than from espeak-ng alone, at the same number of
utterances. Each set is ``polymodal.data.synthetic_speech.synthesize_transcripts`` of the ten digit
words (recorded through a drawn talker, room and microphone and an 8 kHz channel, as the manifest
source's ``synthetic_speech`` makes them) with its flite share, written as WAV files and a
manifest in a temporary folder. Every set trains the preset with ``synthetic_speech=0`` (the
manifest is the synthetic speech), and the run is scored on every FSDD clip by speaker.

Needs flite (``apt-get install flite``) for a share above 0.

    python benchmarks/bench_synthetic_voices.py --fsdd ../shared/data/fsdd-dev --shares 0 0.5
    python benchmarks/bench_synthetic_voices.py train.steps=500 --count 1500 --shares 0 1   # overrides before --shares
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import soundfile

from polymodal.config import load_config
from polymodal.data.synthetic_speech import synthesize_transcripts
from polymodal.evaluation.manifest import evaluate_manifest
from polymodal.training.job import train
from polymodal.training.run import load_run

from bench_fsdd_loso import FSDD, WORDS, fsdd_lines, write  # this folder is on the path when run as a script

RATE = 16000
CHANNEL = 8000  # FSDD's rate: the synthetic speech has its band, as synthetic_speech gives a manifest of it


def synthetic_manifest(count: int, share: float, seed: int, folder: Path) -> Path:
    """``count`` synthetic digit words, ``share`` of them by flite, as WAVs and a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    waves, which = synthesize_transcripts(WORDS, count, sample_rate=RATE, channel=CHANNEL, seed=seed, flite_share=share)
    lines = []
    for i, (wave, word) in enumerate(zip(waves, which)):
        path = folder / f"{i:05d}.wav"
        soundfile.write(path, wave, RATE, subtype="PCM_16")
        lines.append({"audio": path.name, "text": WORDS[word], "label": word})
    return write(lines, folder / "train.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=FSDD)
    parser.add_argument("--count", type=int, default=3000, help="synthetic utterances per set")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5], help="flite shares, one set each")
    parser.add_argument("--seed", type=int, default=0, help="draws the voices and the recordings")
    parser.add_argument("--out", type=Path, help="keep sets and runs here (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (args.fsdd / "recordings").is_dir():
        raise SystemExit(f"no recordings in {args.fsdd}; give --fsdd (the folder of ../shared/data/fsdd-dev)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        real = write(fsdd_lines(args.fsdd.resolve()), folder / "fsdd.jsonl")
        for share in args.shares:
            name = f"flite{share:g}"
            start = time.perf_counter()
            manifest = synthetic_manifest(args.count, share, args.seed, folder / name)
            made = time.perf_counter() - start
            run_dir = folder / f"run_{name}"
            overrides = [f"data.manifest={manifest}", f"run_dir={run_dir}", "train.progress=false", "data.options.synthetic_speech=0"]
            train(load_config(["speech"], [*overrides, f"seed={args.seed}", *args.overrides]))
            result = evaluate_manifest(load_run(run_dir), real, by=["speaker"])["audio_to_text"]
            speakers = {k: v["exact"] for k, v in sorted(result["by"]["speaker"].items())}
            rows.append((share, result["exact"], speakers, made, time.perf_counter() - start))
            print(f"flite share {share:g}: FSDD exact {result['exact']:.1%} ({result['count']} clips)", flush=True)
    print(f"\n{args.count} synthetic utterances per set, seed {args.seed} {' '.join(args.overrides)}")
    names = list(rows[0][2])
    print(f"| flite share | FSDD exact | {' | '.join(names)} | synthesis | in all |")
    print("| ---: | ---: |" + " ---: |" * len(names) + " ---: | ---: |")
    for share, exact, speakers, made, total in rows:
        print(f"| {share:g} | {exact:.1%} | {' | '.join(f'{speakers[n]:.1%}' for n in names)} | {made:.0f} s | {total:.0f} s |")


if __name__ == "__main__":
    main()
