"""How tightly each speaker's Free Spoken Digit Dataset clips are cut, and what their first 40 ms hold.

Issue 12's leave-one-speaker-out folds read george worst, and his errors are "two" -> "four" and
"three" -> "eight": words told apart by their first consonant. This probe measures, per speaker,
the silence a clip keeps before and after its speech, by the rule ``data.trim_db`` cuts with
(``polymodal.data.audio.speech_bounds``: 32 ms frames every 8 ms, silence more than ``--db`` dB
below the loudest), and the spectral centroid of the first 40 ms of the speech: a /t/ or /th/
burst puts its energy high (2-4 kHz), a vowel low. No model, no labels beyond the file names; at
the files' own rate.

    python benchmarks/probe_fsdd_onsets.py --fsdd ../shared/data/fsdd-dev
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from bench_fsdd_loso import FSDD, fsdd_lines  # this folder is on the path when run as a script

from polymodal.data.audio import speech_bounds

FRAME_S, HOP_S, ONSET_S, FFT = 0.032, 0.008, 0.040, 1024


def centroid(x: np.ndarray, rate: int) -> float:
    """Spectral centroid (Hz) of ``x`` under a Hann window."""
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)), FFT)) ** 2
    return float((power * np.fft.rfftfreq(FFT, 1 / rate)).sum() / power.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=FSDD)
    parser.add_argument("--db", type=float, default=30.0)
    parser.add_argument("--words", nargs="+", default=["two", "three", "six", "eight"])
    args = parser.parse_args()
    lead, trail, onset = defaultdict(list), defaultdict(list), defaultdict(list)
    for line in fsdd_lines(args.fsdd):
        x, rate = sf.read(line["audio"], dtype="float64")
        start, end = speech_bounds(torch.from_numpy(x), top_db=args.db, frame_length=int(FRAME_S * rate), hop_length=int(HOP_S * rate))
        speaker = line["speaker"]
        lead[speaker].append(start / rate)
        trail[speaker].append((len(x) - end) / rate)
        onset[speaker, line["text"]].append(centroid(x[start : start + int(ONSET_S * rate)], rate))
    print("Silence each clip keeps before and after its speech (ms, mean), and the spectral centroid (Hz, mean) of the first 40 ms of each word")
    print(f"| speaker | clips | before | after | {' | '.join(args.words)} |")
    print("| --- | ---: | ---: | ---: |" + " ---: |" * len(args.words))
    for s in sorted(lead):
        cells = " | ".join(f"{np.mean(onset[s, w]):.0f}" for w in args.words)
        print(f"| {s} | {len(lead[s])} | {1000 * np.mean(lead[s]):.1f} | {1000 * np.mean(trail[s]):.1f} | {cells} |")


if __name__ == "__main__":
    main()
