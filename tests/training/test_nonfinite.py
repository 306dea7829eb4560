"""The non-finite guard: a step with a NaN loss or gradient updates nothing (weights and optimiser
state bitwise unchanged, the schedule advances), is counted and logged with its cause; fit with
skips matches a plain loop written here that skips the same steps; K skips in a row stop the run
with one line and the last checkpoint intact; weights that are not finite are never saved."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from polymodal.config import Config
from polymodal.errors import RunError
from polymodal.models.output import StepOutput
from polymodal.training.checkpoint import latest_checkpoint, load_checkpoint
from polymodal.training.loop import fit, optimizer_step, start_state
from polymodal.training.optim import build_optimizer, build_scheduler
from polymodal.training.sampler import build_loader

sys.path.insert(0, str(Path(__file__).parent))  # the toy run beside this file
from toy import Batch, Points, Regression, collate, toy_config, toy_model  # noqa: E402

def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_skipped_step_changes_no_weight_and_no_optimiser_state(tmp_path):
    config = toy_config(steps=6, warmup_steps=4)
    model = toy_model()
    state = start_state(model, config, tmp_path, resume=False)
    clean = collate([Points(poisoned=())[i] for i in range(8)])
    poisoned = collate([Points()[i] for i in range(8)])  # holds item 5
    optimizer_step(model, state, iter([clean]), config.train)  # moments exist now
    weights, moments = copy.deepcopy(model.state_dict()), copy.deepcopy(state.optimizer.state_dict())
    lr_before = state.scheduler.get_last_lr()[0]

    out, losses, grad_norm = optimizer_step(model, state, iter([poisoned]), config.train)

    assert math.isnan(losses["mse"]) and math.isnan(grad_norm)
    assert _same(model.state_dict(), weights)
    assert _same(state.optimizer.state_dict()["state"], moments["state"])  # Adam's step count included
    assert all(p.grad is None for p in model.parameters())
    assert (state.step, state.guard.skipped, state.guard.consecutive) == (2, 1, 1)
    # The schedule advanced: step 3's rate is the one a run without the skip would use.
    reference_optimizer = build_optimizer(toy_model(), config.train)
    reference = build_scheduler(reference_optimizer, config.train)
    for _ in range(2):
        reference_optimizer.step()
        reference.step()
    assert state.scheduler.get_last_lr()[0] == reference.get_last_lr()[0] != lr_before
    optimizer_step(model, state, iter([clean]), config.train)
    assert (state.guard.skipped, state.guard.consecutive) == (1, 0)


def _plain_loop(config: Config) -> tuple[Regression, int]:
    """The same training written out simply: a step whose loss or gradient norm is not finite is
    skipped, the schedule steps regardless."""
    model, train = toy_model(), config.train
    optimizer, skipped = build_optimizer(model, train), 0
    scheduler = build_scheduler(optimizer, train)
    loader = iter(build_loader(Points(), collate, batch_size=train.batch_size, seed=config.seed))
    for _ in range(train.steps):
        out = model(next(loader))
        loss = sum(1.0 * term.float() for term in out.losses.values())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        if math.isfinite(loss.item()) and math.isfinite(norm.item()):
            optimizer.step()
        else:
            skipped += 1
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return model, skipped


def test_fit_with_skips_matches_a_plain_loop_that_skips(tmp_path, caplog):
    config = toy_config()
    model = toy_model()
    with caplog.at_level("WARNING", logger="polymodal.training.nonfinite"):
        fit(model, Points(), collate, config, tmp_path)
    reference, skipped = _plain_loop(config)
    assert skipped >= 2  # the poisoned items land in this many batches of the 12 steps
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    train = [e for e in _metrics(tmp_path) if e["split"] == "train"]
    assert train[-1]["skipped_steps"] == skipped
    counts = [e["skipped_steps"] for e in train]
    assert counts == sorted(counts) and counts[0] in (0, 1)
    skipped_steps = [e["step"] for e in train if e["loss/mse"] == "nan"]
    assert len(skipped_steps) == skipped
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == skipped
    assert f"step {skipped_steps[0]} skipped, no update: non-finite loss mse=nan, l1=nan" in warnings[0]


class InfiniteGradient(Regression):
    """A finite loss whose gradient is infinite: d sqrt(w) / dw at w = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, batch: Batch) -> StepOutput:
        out = super().forward(batch)
        return StepOutput(losses={**out.losses, "gate": self.gate.sqrt()})


def test_a_non_finite_gradient_is_named_and_skipped(tmp_path, caplog):
    model = InfiniteGradient()
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level("WARNING", logger="polymodal.training.nonfinite"), pytest.raises(RunError) as caught:
        fit(model, Points(poisoned=()), collate, toy_config(max_nonfinite_steps=3), tmp_path)
    assert "non-finite gradient (norm inf) in gate" in caplog.records[0].getMessage()
    assert "steps 1-3: 3 in a row" in str(caught.value) and "no checkpoint was written" in str(caught.value)
    assert _same(model.state_dict(), before)
    assert latest_checkpoint(tmp_path) is None


class FailsFrom(Regression):
    """Finite until its ``fail_from``-th call, NaN from then on."""

    def __init__(self, fail_from: int) -> None:
        super().__init__()
        self.calls, self.fail_from = 0, fail_from

    def forward(self, batch: Batch) -> StepOutput:
        self.calls += 1
        out = super().forward(batch)
        if self.calls < self.fail_from:
            return out
        return StepOutput(losses={"mse": out.losses["mse"] * float("inf") * 0.0, "l1": out.losses["l1"]})


def test_k_skips_in_a_row_stop_the_run_with_the_last_checkpoint_intact(tmp_path):
    torch.manual_seed(0)
    model = FailsFrom(fail_from=6)
    with pytest.raises(RunError) as caught:
        fit(model, Points(poisoned=()), collate, toy_config(max_nonfinite_steps=4, ckpt_every=4), tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert "steps 6-9: 4 in a row with a non-finite loss or gradient (train.max_nonfinite_steps=4" in message
    assert "mse=nan" in message and "step_0000008, is intact" in message and "--resume" in message
    # Step 8's checkpoint was written during the skips: it holds step 5's weights, the last update.
    saved = Regression()
    assert load_checkpoint(latest_checkpoint(tmp_path), model=saved)["consecutive_skips"] == 3
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]) and torch.isfinite(tensor).all()


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    def corrupt(model, step):
        if step == 8:  # as an update gone wrong would leave them
            model.linear.bias.fill_(float("inf"))
        return {}

    with pytest.raises(RunError, match=r"step 8: the weights are not finite \(linear.bias\)") as caught:
        fit(toy_model(), Points(poisoned=()), collate, toy_config(eval_every=4), tmp_path, evaluate=corrupt)
    assert str(caught.value).count("step_0000004, is intact") == 1
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000004"]


def test_max_nonfinite_steps_must_be_positive():
    from polymodal.config import load_config
    from polymodal.errors import ConfigError

    with pytest.raises(ConfigError, match="train.max_nonfinite_steps: must be > 0"):
        load_config(["tiny"], ["train.max_nonfinite_steps=0"])
