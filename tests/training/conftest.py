"""A two-task toy for the multi-objective tests: a shared trunk, one head per task, losses of
different scales, dropout (so exact resume must replay the RNG), and a ``set_progress`` hook."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from polymodal.models.output import StepOutput

DIM_IN, DIM_HIDDEN = 6, 16


@dataclasses.dataclass
class TwoTaskBatch:
    x: torch.Tensor  # (B, DIM_IN)
    y: torch.Tensor  # (B, 2): one target per task

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def to(self, device):
        return TwoTaskBatch(self.x.to(device), self.y.to(device))


class TwoTaskData(Dataset):
    """y_k = scale_k * tanh(x . w_k); the second task's targets are ``scale`` times larger."""

    def __init__(self, n: int = 64, *, scale: float = 3.0, seed: int = 5) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, DIM_IN, generator=gen)
        w = torch.randn(DIM_IN, 2, generator=gen)
        self.y = torch.tanh(self.x @ w) * torch.tensor([1.0, scale])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def collate(items) -> TwoTaskBatch:
    return TwoTaskBatch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class TwoTaskModel(nn.Module):
    """Shared trunk -> heads ``first`` and ``second``; losses named ``first`` and ``second``.

    ``private`` is reached by the first loss alone. ``progress`` records the ``set_progress`` calls.
    ``agreement`` adds a third term on the trunk, so that PCGrad's random order matters.
    """

    def __init__(self, *, dropout: float = 0.0, agreement: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(DIM_IN, DIM_HIDDEN), nn.Tanh(), nn.Dropout(dropout))
        self.first = nn.Linear(DIM_HIDDEN, 1)
        self.second = nn.Linear(DIM_HIDDEN, 1)
        self.private = nn.Parameter(torch.zeros(1))
        self.agreement = agreement
        self.progress: list[float] = []

    def set_progress(self, fraction: float) -> None:
        self.progress.append(fraction)

    def forward(self, batch: TwoTaskBatch) -> StepOutput:
        hidden = self.trunk(batch.x)  # (B, DIM_HIDDEN)
        first = self.first(hidden).squeeze(-1) + self.private  # (B,)
        second = self.second(hidden).squeeze(-1)
        losses = {
            "first": (first - batch.y[:, 0]).square().mean(),
            "second": (second - batch.y[:, 1]).square().mean(),
        }
        if self.agreement:
            losses["agreement"] = (first - second).square().mean()
        metrics = {"progress": self.progress[-1]} if self.progress else {}
        return StepOutput(losses=losses, metrics=metrics)


@dataclasses.dataclass(frozen=True)
class TwoTask:
    model: type[TwoTaskModel]
    data: type[TwoTaskData]
    batch: type[TwoTaskBatch]
    collate: object


@pytest.fixture
def two_task() -> TwoTask:
    return TwoTask(TwoTaskModel, TwoTaskData, TwoTaskBatch, collate)
