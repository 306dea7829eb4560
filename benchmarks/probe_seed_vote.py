"""Captions of one fold by several models, and by one model at several test-time speeds, scored alone
and by a majority vote (issue 12: are a leave-one-speaker-out fold's errors the seed's or the
checkpoint's, which an ensemble would average away, or the held-out speaker's, which every model
makes?).

A member is ``RUN`` (the run's chosen checkpoint, as ``polymodal eval`` loads it) or ``RUN@STEP`` (a
kept checkpoint). ``--speeds`` plays every test clip at those speeds as well (``change_speed``:
polyphase resampling, so pitch and formants move with the tempo), each speed's speaker statistics
taken from the sped clips. Every (member, speed) generates its greedy caption of every line, as
``polymodal eval RUN --manifest`` does; the vote keeps each line's most frequent caption, a tie
going to the first (member, speed) listed. A vote of runs costs a training run per member, so it
measures the spread of the folds, not a way to meet the 5-minute fold.

    python benchmarks/bench_fsdd_loso.py --fsdd ../shared/data/fsdd-dev --out OUT_S seed=S   # S = 0, 1, 2
    python benchmarks/probe_seed_vote.py OUT_0/test_george.jsonl OUT_0/run_george OUT_1/run_george OUT_2/run_george
    python benchmarks/probe_seed_vote.py OUT_0/test_george.jsonl OUT_0/run_george OUT_0/run_george@2000 OUT_0/run_george@1750
    python benchmarks/probe_seed_vote.py OUT_0/test_george.jsonl OUT_0/run_george --speeds 1.0 0.9 0.95 1.05 1.1
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from polymodal.data.augment_audio import change_speed
from polymodal.data.manifest import ManifestDataset
from polymodal.evaluation.manifest import caption_judge, generate_captions
from polymodal.modality import Modality
from polymodal.training.checkpoint import load_checkpoint, step_folder
from polymodal.training.run import load_run
from polymodal.training.schedules import restore_progress


class SpedClips(torch.utils.data.Dataset):
    """A manifest dataset's samples with their audio played ``factor`` times faster."""

    def __init__(self, base: ManifestDataset, factor: float) -> None:
        self.base, self.factor = base, factor

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        sample = self.base[index]
        if sample is None or sample.audio is None or self.factor == 1.0:
            return sample
        return dataclasses.replace(sample, audio=torch.from_numpy(change_speed(sample.audio.numpy(), self.factor).astype(np.float32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest")
    parser.add_argument("members", nargs="+", help="RUN or RUN@STEP, of the same task")
    parser.add_argument("--speeds", nargs="+", type=float, default=[1.0], help="test-time speeds, 1.0 first")
    args = parser.parse_args()
    captions: dict[str, dict[int, str]] = {}
    judge = None
    for member in args.members:
        run_dir, _, step = member.partition("@")
        run = load_run(run_dir)
        if step:  # that checkpoint's weights and training progress instead, as load_run takes the chosen one's
            saved = load_checkpoint(step_folder(Path(run_dir), int(step)), model=run.model)
            restore_progress(run.model, saved.get("step"), run.config.train.steps)
        run.model.eval()
        dataset = ManifestDataset.from_config(args.manifest, run.config.data)
        judge = caption_judge(dataset, run.source.label_parser)
        for speed in args.speeds:
            clips = SpedClips(dataset, speed)
            run.collator.fit_speakers([clips])  # the held-out speaker's statistics, from his sped clips
            captions[f"{member} x{speed:g}"] = generate_captions(run, clips, list(range(len(dataset))), Modality.AUDIO, batch_size=64)
    lines = sorted(set.intersection(*(set(made) for made in captions.values())))

    def share(right) -> str:
        return f"{sum(right(i) for i in lines) / len(lines):.1%}"

    for name, made in captions.items():
        print(f"{name}: {share(lambda i, made=made: judge(i, made[i]))} of {len(lines)}")
    # most_common keeps first-seen order among equal counts: a tie goes to the first listed
    vote = {i: Counter(made[i] for made in captions.values()).most_common(1)[0][0] for i in lines}
    print(f"vote of {len(captions)}: {share(lambda i: judge(i, vote[i]))}")
    print(f"read right by every one: {share(lambda i: all(judge(i, made[i]) for made in captions.values()))}; "
          f"by none: {share(lambda i: not any(judge(i, made[i]) for made in captions.values()))}")


if __name__ == "__main__":
    main()
