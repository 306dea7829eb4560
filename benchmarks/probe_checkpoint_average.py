"""A run's last checkpoints scored on a manifest alone and as uniform weight averages (issue 12:
does averaging the weights of the late checkpoints, as stochastic weight averaging does (Izmailov
et al. 2018, arXiv:1803.05407), read a new speaker better than the last checkpoint?).

Every checkpoint named by ``--steps`` must have been kept: train with ``train.ckpt_every`` at the
spacing wanted and ``train.keep_checkpoints=0``. Floating-point tensors are averaged in float64 and
cast back; anything else (integer buffers) is taken from the last checkpoint. The model's tied LM
head is not in the files and follows its embedding.

    python benchmarks/bench_fsdd_loso.py --fsdd ../shared/data/fsdd-dev --out OUT train.ckpt_every=100 \\
        train.keep_checkpoints=0 train.early_stop=0 --folds george
    python benchmarks/probe_checkpoint_average.py OUT/run_george OUT/test_george.jsonl --steps 1000,1100,1200,1300,1400,1500
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from polymodal.evaluation.manifest import evaluate_manifest
from polymodal.training.checkpoint import MODEL_FILE, step_folder
from polymodal.training.run import load_run


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors; other tensors from the last state."""
    last = states[-1]
    return {
        name: torch.stack([s[name].double() for s in states]).mean(0).to(last[name].dtype)
        if last[name].is_floating_point() else last[name]
        for name in last
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("manifest")
    parser.add_argument("--steps", required=True, help="comma-separated checkpoint steps, oldest first")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    run = load_run(args.run_dir, checkpoint="latest")
    states = [load_file(str(step_folder(args.run_dir, s) / MODEL_FILE)) for s in steps]

    def score(state: dict[str, torch.Tensor]) -> dict[str, float]:
        # A tensor shared with another (the tied LM head) is stored once: it may be missing, nothing else.
        missing, unexpected = run.model.load_state_dict(state, strict=False)
        own = run.model.state_dict()
        stored = {own[name].data_ptr() for name in state}
        untied = [name for name in missing if own[name].data_ptr() not in stored]
        if untied or unexpected:
            raise SystemExit(f"checkpoint does not match the run's model: missing {untied[:5]}, unexpected {unexpected[:5]}")
        return {name: figures.get("exact", figures.get("accuracy")) for name, figures in evaluate_manifest(run, args.manifest).items()}

    for step, state in zip(steps[-3:], states[-3:]):
        print(f"step {step}: {score(state)}")
    for k in sorted({3, 5, len(steps)} & set(range(2, len(steps) + 1))):
        print(f"mean of steps {steps[-k:]}: {score(average(states[-k:]))}")


if __name__ == "__main__":
    main()
