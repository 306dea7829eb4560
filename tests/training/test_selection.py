"""Checkpoint selection and early stopping (``train.select``, ``train.early_stop``): the best
checkpoint holds the weights of the best evaluation; a replayed evaluation (resume from an earlier
checkpoint) decides as the uninterrupted run did; training stops after ``early_stop`` evaluations
without a new best, with a checkpoint there; ``load_run`` picks the best; the config checks."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

from polymodal.config import Config, TrainConfig, load_config
from polymodal.errors import ConfigError
from polymodal.training.checkpoint import latest_checkpoint
from polymodal.training.loop import fit
from polymodal.training.selection import Selection, best_dir, read_best

FIGURE = "task/exact"


def _best_weight(run_dir) -> float:
    return safetensors.torch.load_file(str(best_dir(run_dir) / "model.safetensors"))["weight"].item()


def _observe_all(selection: Selection, values: dict[int, float], *, pass_number: int = 0) -> list[int]:
    """Feed evaluations in step order; returns the steps at which the best weights were written."""
    written = []
    for step, value in values.items():
        model = nn.Linear(1, 1, bias=False)
        nn.init.constant_(model.weight, float(step + 1000 * pass_number))  # the weights say which step and pass
        selection.observe(model, step, {FIGURE: value, "other": 0.0})
        if _best_weight(selection.run_dir) == step + 1000 * pass_number:
            written.append(step)
    return written


def test_the_best_checkpoint_holds_the_best_evaluations_weights(tmp_path):
    selection = Selection(TrainConfig(select=FIGURE, eval_every=10), tmp_path)
    written = _observe_all(selection, {10: 0.2, 20: 0.5, 30: 0.4, 40: 0.5, 50: 0.7, 60: 0.1})
    assert written == [10, 20, 40, 50]  # a tie (40) takes the later weights
    assert read_best(tmp_path) == {"step": 50, "figure": FIGURE, "value": 0.7}
    assert _best_weight(tmp_path) == 50.0


def test_a_replayed_evaluation_decides_as_the_uninterrupted_run(tmp_path):
    values = {10: 0.3, 20: 0.6, 30: 0.5, 40: 0.55, 50: 0.8}
    whole = Selection(TrainConfig(select=FIGURE, eval_every=10), tmp_path / "whole")
    _observe_all(whole, values)
    # Killed after the evaluation at 50 but resumed from the checkpoint at 20: 30-50 replay.
    killed = Selection(TrainConfig(select=FIGURE, eval_every=10), tmp_path / "killed")
    _observe_all(killed, values)
    replayed = _observe_all(killed, {s: v for s, v in values.items() if s > 20}, pass_number=1)
    assert replayed == [50]  # 30 and 40 are not bests against the steps before them
    assert read_best(tmp_path / "killed") == read_best(tmp_path / "whole")
    for step in (25, 35, 45, 55):
        assert killed.should_stop(step) == whole.should_stop(step)


def test_early_stop_counts_evaluations_since_the_best(tmp_path):
    selection = Selection(TrainConfig(select=FIGURE, eval_every=10, early_stop=2), tmp_path)
    _observe_all(selection, {10: 0.5, 20: 0.4})
    assert not selection.should_stop(20)  # one evaluation without a new best
    _observe_all(selection, {30: 0.5})
    assert not selection.should_stop(30)  # a tie restarts the count
    _observe_all(selection, {40: 0.45, 50: 0.1})
    assert not selection.should_stop(40) and selection.should_stop(50)
    with pytest.raises(ConfigError, match="not a validation figure of this run; valid: other, task/exact"):
        Selection(TrainConfig(select="task/exatc", eval_every=10), tmp_path / "x").observe(nn.Linear(1, 1), 10, {FIGURE: 1.0, "other": 0.0})


class _Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def forward(self, batch):
        from polymodal.models.output import StepOutput

        x, y = batch
        return StepOutput(losses={"mse": (self.net(x).squeeze(-1) - y).square().mean()})


def _collate(items):
    class Pair(tuple):
        size = len(items)

        def to(self, device):
            return self

    return Pair((torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))


def test_fit_stops_early_with_a_checkpoint_and_resume_stays_stopped(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, generator=gen), torch.randn((), generator=gen)) for _ in range(16)]
    train = TrainConfig(steps=40, batch_size=4, warmup_steps=0, log_every=5, ckpt_every=100, eval_every=5, select=FIGURE, early_stop=2, progress=False, precision="fp32")
    config = Config(device="cpu", train=train)
    scores = iter([0.5, 0.9, 0.8, 0.7, 0.95, 0.1, 0.1, 0.1])  # best at step 10; 15 and 20 bring nothing
    selection = Selection(train, tmp_path)

    def evaluate(model, step):
        figures = {FIGURE: next(scores)}
        selection.observe(model, step, figures)
        return figures

    result = fit(_Regression(), data, _collate, config, tmp_path, evaluate=evaluate, should_stop=selection.should_stop)
    assert result.step == 20 and latest_checkpoint(tmp_path).name == "step_0000020"
    assert read_best(tmp_path)["step"] == 10
    again = fit(_Regression(), data, _collate, config, tmp_path, resume=True, evaluate=evaluate, should_stop=selection.should_stop)
    assert again.step == 20  # a stopped run resumed does not train on


def test_the_config_checks_select_and_early_stop():
    with pytest.raises(ConfigError, match="needs periodic evaluation; set train.eval_every"):
        load_config(["tiny"], ["train.select=audio_to_text/exact", "train.eval_every=0"])
    with pytest.raises(ConfigError, match="name it with train.select"):
        load_config(["tiny"], ["train.early_stop=3"])
    config = load_config(["tiny"], ["train.select=audio_to_text/exact", "train.eval_every=5", "train.early_stop=2"])
    assert (config.train.select, config.train.early_stop) == ("audio_to_text/exact", 2)
