"""train.compile: compiled transformer blocks compute what the eager ones do (outputs and every
gradient, padded grid and skipped padding), and run eagerly again after training; ``fit`` with
``train.compile`` compiles them (its counted first step once left them eager for good)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from polymodal.backbones import BACKBONES
from polymodal.models.masks import prefix_lm_mask
from polymodal.models.output import StepOutput
from polymodal.training.compile import compiled_blocks
from polymodal.training.loop import fit

sys.path.insert(0, str(Path(__file__).parent))  # toy.py beside this file
from toy import Points, collate, toy_config  # noqa: E402

DIM = 32


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return BACKBONES.build({"name": "transformer", "num_layers": 2, "num_heads": 4}, DIM)


def test_nothing_is_compiled_when_off_or_absent():
    model = _backbone()
    with compiled_blocks(model, enabled=False) as count:
        assert count == 0
    with compiled_blocks(torch.nn.Linear(2, 2)) as count:
        assert count == 0


class _Unit(nn.Module):
    compile_unit = True  # what train.compile compiles

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class _UnitRegression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unit = _Unit()

    def forward(self, batch) -> StepOutput:
        return StepOutput(losses={"mse": (self.unit(batch.x) - batch.y).square().mean()})


def test_fit_with_train_compile_compiles_its_units(tmp_path, monkeypatch):
    """A fresh run counts its first step's FLOPs under a dispatch mode; the units must still be
    compiled for the steps after it (a recording backend stands in for Inductor)."""
    torch._dynamo.reset()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(_Unit, "compile", lambda self, **options: nn.Module.compile(self, backend=record, **options))
    torch.manual_seed(0)
    model = _UnitRegression()
    fit(model, Points(poisoned=()), collate, toy_config(steps=3, compile=True), tmp_path)
    assert graphs, "train.compile ran every step eagerly"
    assert model.unit._compiled_call_impl is None  # eager again after training


def _step(model: torch.nn.Module, lengths: list[int], needed: bool) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(lengths))
    n = max(lengths) + 3  # three target tokens after each source
    tokens = torch.randn(len(lengths), n, DIM, generator=generator)
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None] + 3
    is_target = (torch.arange(n)[None] >= torch.tensor(lengths)[:, None]) & valid
    keep = (valid | is_target) if needed else None
    out = model(tokens, mask=prefix_lm_mask(is_target, valid), needed=keep)
    out[valid].square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return [out.detach(), *grads]


@pytest.mark.slow  # compiling takes a minute or more on a busy 2-core CPU
def test_compiled_blocks_match_eager_then_run_eagerly_again():
    model = _backbone()
    batches = [([5, 2, 4], False), ([7, 1, 1, 6], True), ([3, 3], True)]  # shapes change: dynamic
    eager = [_step(model, *batch) for batch in batches]
    torch._dynamo.reset()
    with compiled_blocks(model) as count:
        assert count == 2
        compiled = [_step(model, *batch) for batch in batches]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not run eagerly
    for got_step, want_step in zip(compiled, eager):
        for got, want in zip(got_step, want_step):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(block._compiled_call_impl is None for block in model.blocks)
