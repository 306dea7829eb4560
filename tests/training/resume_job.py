"""A small training run for test_resume.py: dropout, shuffled data, frequent checkpoints.

Usage: python resume_job.py RUN_DIR [--resume] [--step-delay SECONDS] [--steps N]
The delay slows the data pipeline only (it changes no number), so the test can kill the run mid-way.
A run stopped by SIGINT or SIGTERM exits with the CLI's status for it (128 + the signal number).
"""

import argparse
import dataclasses
import logging
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from polymodal.config import Config, TrainConfig
from polymodal.errors import RunInterrupted
from polymodal.models.output import StepOutput
from polymodal.training.loop import fit

STEPS = 24


@dataclasses.dataclass
class Pair:
    x: torch.Tensor  # (B, 8)
    y: torch.Tensor  # (B, 2)

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def to(self, device):
        return Pair(self.x.to(device), self.y.to(device))


class Points(Dataset):
    def __init__(self, n: int = 40) -> None:
        gen = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = torch.sin(self.x[:, :2] * 2) + self.x[:, 2:4]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class SlowCollate:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, items):
        time.sleep(self.delay)
        return Pair(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class DropoutMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 2))

    def forward(self, batch: Pair) -> StepOutput:
        return StepOutput(losses={"mse": (self.net(batch.x) - batch.y).square().mean()})


def evaluate(model: nn.Module, step: int) -> dict[str, float]:
    # Draws from the global RNG on purpose: resume must replay it at the same point.
    return {"probe": torch.rand(()).item(), "weight_sum": float(model.net[0].weight.sum())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    train = TrainConfig(
        steps=args.steps, batch_size=6, grad_accum=2, lr=3e-2, warmup_steps=3, log_every=2, ckpt_every=4,
        keep_checkpoints=2, eval_every=6, precision="fp32", progress=False,
    )
    config = Config(seed=3, device="cpu", train=train)
    torch.manual_seed(11)
    collate = SlowCollate(args.step_delay)
    try:
        fit(DropoutMLP(), Points(), collate, config, args.run_dir, resume=args.resume, evaluate=evaluate)
    except RunInterrupted as exc:
        logging.getLogger(__name__).warning("%s", exc)
        sys.exit(exc.exit_status)


if __name__ == "__main__":
    main()
