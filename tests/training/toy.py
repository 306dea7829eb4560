"""A toy regression run for the training tests: a dataset with two poisoned (NaN) items, so any
batch holding one has a NaN loss; its collate function, model and a small fp32 config."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.data import Dataset

from polymodal.config import Config, TrainConfig
from polymodal.models.output import StepOutput

NUM_ITEMS = 48
POISONED = (5, 30)  # items whose input is NaN: any batch holding one has a NaN loss


@dataclasses.dataclass
class Batch:
    """Inputs and targets; what the training loop needs of a batch: ``size`` and ``to``."""

    x: torch.Tensor  # (B, D_in)
    y: torch.Tensor  # (B,) or (B, D_out)

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def to(self, device):
        return Batch(self.x.to(device), self.y.to(device))


class Points(Dataset):
    def __init__(self, poisoned=POISONED) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x = torch.randn(NUM_ITEMS, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -1.0, 2.0, 0.5])
        self.x[list(poisoned)] = float("nan")

    def __len__(self) -> int:
        return NUM_ITEMS

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def collate(items) -> Batch:
    return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: Batch) -> StepOutput:
        err = self.linear(batch.x).squeeze(-1) - batch.y  # (B, 4) -> (B,)
        return StepOutput(losses={"mse": err.square().mean(), "l1": err.abs().mean()})


def toy_config(**train) -> Config:
    settings = dict(steps=12, batch_size=8, lr=0.05, warmup_steps=2, log_every=1, ckpt_every=4, precision="fp32",
                    progress=False)  # fmt: skip
    settings.update(train)
    return Config(seed=2, device="cpu", train=TrainConfig(**settings))


def toy_model() -> Regression:
    torch.manual_seed(0)
    return Regression()
