"""train.compile: compiled transformer blocks compute what the eager ones do (outputs and every
gradient, padded grid and skipped padding), and run eagerly again after training; ``fit`` with
``train.compile`` compiles them (its counted first step once left them eager for good)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from polymodal.backbones import BACKBONES
from polymodal.backbones.transformer import TransformerBlock
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


class _BlockRegression(nn.Module):
    """The toy regression through one transformer block (a compile unit) with two loss terms."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 2 * DIM)
        self.backbone = BACKBONES.build({"name": "transformer", "num_layers": 1, "num_heads": 4, "dropout": dropout}, DIM)
        self.out = nn.Linear(DIM, 1)

    def forward(self, batch) -> StepOutput:
        tokens = self.inp(batch.x).unflatten(1, (2, DIM))  # (B, 2, D)
        err = self.out(self.backbone(tokens).mean(1)).squeeze(-1) - batch.y
        return StepOutput(losses={"mse": err.square().mean(), "l1": err.abs().mean()})


@pytest.fixture
def aot_blocks(monkeypatch):
    """Transformer blocks compiled through AOTAutograd without Inductor (its backward, donated
    buffers included, as Inductor's; fast to build)."""
    torch._dynamo.reset()
    monkeypatch.setattr(TransformerBlock, "compile", lambda self, **options: nn.Module.compile(self, backend="aot_eager", **options))


@pytest.mark.parametrize("surgery", ["pcgrad", "gradnorm"])
def test_compiled_blocks_train_with_gradient_surgery(tmp_path, aot_blocks, surgery):
    """Surgery takes one gradient per loss from the same graph (retain_graph): a compiled backward
    with donated buffers refused it on the second step."""
    config = toy_config(steps=3, compile=True, gradient_surgery={"name": surgery})
    result = fit(_BlockRegression(), Points(poisoned=()), collate, config, tmp_path)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled after the counted first step
    assert all(torch.isfinite(torch.tensor(value)) for value in result.losses.values())


def test_a_diagnose_hook_runs_the_compiled_model_eagerly(tmp_path, aot_blocks):
    """The live diagnostics take several gradients from one pass of the model, as evaluation
    measures it: eagerly, not through the blocks compiled for training."""
    graphs, seen = torch._dynamo.utils.counters["stats"], []

    def diagnose(model, step, logger):
        before = graphs["unique_graphs"]
        model.eval()  # as the live diagnostics measure: compiled, this would make an eval-mode graph
        batch = collate([Points(poisoned=())[i] for i in range(4)])
        losses = model(batch).losses
        grads = [torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses.values()]
        model.train()
        seen.append((len(grads), graphs["unique_graphs"] - before))

    fit(_BlockRegression(), Points(poisoned=()), collate, toy_config(steps=3, compile=True), tmp_path, diagnose=diagnose)
    assert seen == [(2, 0)] * 3  # two gradients each time, and no graph compiled for them
    assert graphs["unique_graphs"] > 0  # the training steps' blocks were compiled


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


@pytest.mark.slow  # two runs compiled by Inductor: about a minute on 2 cores
def test_a_compiled_run_with_dropout_resumes_bitwise(tmp_path):
    """Inductor draws the compiled blocks' dropout masks itself; a run resumed from its middle
    checkpoint still ends with bitwise the weights of the run that never stopped."""
    config = toy_config(steps=6, ckpt_every=3, compile=True)
    whole = tmp_path / "whole"
    torch._dynamo.reset()
    fit(_BlockRegression(dropout=0.2), Points(poisoned=()), collate, config, whole)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000006")
    (resumed / "checkpoints" / "latest").write_text("step_0000003")
    torch._dynamo.reset()
    fit(_BlockRegression(dropout=0.2), Points(poisoned=()), collate, config, resumed, resume=True)
    want = safetensors.torch.load_file(whole / "checkpoints" / "step_0000006" / "model.safetensors")
    got = safetensors.torch.load_file(resumed / "checkpoints" / "step_0000006" / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
