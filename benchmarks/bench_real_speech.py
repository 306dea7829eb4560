"""How well a trained run reads REAL human speech: spoken digits of the Free Spoken Digit Dataset
(4 speakers, 8 kHz, ``../shared/data/fsdd-dev``) and the Asterisk PBX's number prompts (Debian
``asterisk-core-sounds-en-wav``: every ``<number>.wav`` under /usr/share/asterisk/sounds/en/digits,
0-20 and the tens to 90, 8 kHz).

Claim (issue 12): the default main-job model, trained only on the built-in synthetic speech, reads
both at >= 70% exact (a generated caption is right when it names the clip's number). The script
writes a manifest of each set into a temporary folder (lines carry the speaker) and scores it with
``polymodal.evaluation.manifest.evaluate_manifest``, as ``polymodal eval RUN --manifest`` does.
A set whose folder is absent is reported as absent.

    python benchmarks/bench_real_speech.py runs/default
    python benchmarks/bench_real_speech.py runs/default --fsdd ../shared/data/fsdd-dev --asterisk /usr/share/asterisk/sounds/en/digits
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch

from polymodal.evaluation.manifest import evaluate_manifest
from polymodal.training.run import load_run

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "data" / "fsdd-dev"
ASTERISK = Path("/usr/share/asterisk/sounds/en/digits")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")  # {digit}_{speaker}_{take}.wav
NUMBER_NAME = re.compile(r"^(\d+)\.wav$")


def fsdd_lines(folder: Path) -> list[dict]:
    """One manifest line per FSDD recording: audio, the digit's word, label and speaker."""
    lines = []
    for path in sorted((folder / "recordings").glob("*.wav")):
        match = FSDD_NAME.match(path.name)
        if match:
            digit = int(match.group(1))
            lines.append({"audio": str(path), "text": WORDS[digit], "label": digit, "speaker": match.group(2)})
    return lines


def asterisk_lines(folder: Path) -> list[dict]:
    """One manifest line per Asterisk number prompt (``<number>.wav``), speaker "asterisk"."""
    lines = []
    for path in sorted(folder.glob("*.wav")):
        match = NUMBER_NAME.match(path.name)
        if match:
            lines.append({"audio": str(path), "label": int(match.group(1)), "speaker": "asterisk"})
    return lines


def write_manifest(lines: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--fsdd", type=Path, default=FSDD)
    parser.add_argument("--asterisk", type=Path, default=ASTERISK)
    parser.add_argument("--checkpoint", default="auto", choices=["auto", "best", "latest"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_grad_enabled(False)
    run = load_run(args.run_dir, checkpoint=args.checkpoint)
    sets = {"fsdd-dev": (args.fsdd, fsdd_lines), "asterisk": (args.asterisk, asterisk_lines)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (folder, lines_of) in sets.items():
            # Absolute: a manifest reads relative paths from its own (temporary) folder.
            lines = lines_of(folder.resolve()) if folder.is_dir() else []
            if not lines:
                rows.append((name, "absent", "", "", ""))
                continue
            started = time.perf_counter()
            figures = evaluate_manifest(run, write_manifest(lines, Path(tmp) / f"{name}.jsonl"), by=["speaker"])
            result = next(iter(figures.values()))  # the run's (first) audio -> text task
            speakers = ", ".join(f"{s} {g['exact']:.1%}" for s, g in result["by"]["speaker"].items())
            rows.append((name, f"{result['exact']:.1%}", str(result["count"]), speakers, f"{time.perf_counter() - started:.0f} s"))
    print(f"run: {args.run_dir} ({run.checkpoint})")
    print("| set | audio -> text exact | clips | by speaker | time |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
