"""Loss schedules: the piecewise-linear weight by hand, validation at config load, weights that
multiply ``loss_weights``, and a training run that logs each term's weight and tells the model how
far training has gone."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from polymodal.config import Config, TrainConfig, load_config
from polymodal.errors import ConfigError
from polymodal.training.loop import fit
from polymodal.training.schedules import effective_loss_weights, schedule_weight, training_progress

RAMP = [[0, 0], [0.3, 0], [0.6, 1]]  # off for 30% of training, full weight from 60%


@pytest.mark.parametrize(
    "progress, expected", [(0.0, 0.0), (0.2, 0.0), (0.3, 0.0), (0.45, 0.5), (0.5, 2 / 3), (0.6, 1.0), (0.99, 1.0)]
)
def test_ramp_by_hand(progress, expected):
    assert schedule_weight(RAMP, progress) == pytest.approx(expected)


def test_constant_outside_the_points_and_step_changes():
    assert schedule_weight([[0.5, 2.0]], 0.0) == schedule_weight([[0.5, 2.0]], 0.9) == 2.0
    late = [[0.2, 3.0], [0.8, 1.0]]
    assert schedule_weight(late, 0.1) == 3.0 and schedule_weight(late, 0.9) == 1.0
    assert schedule_weight(late, 0.5) == pytest.approx(2.0)
    step = [[0, 1], [0.5, 1], [0.5, 0]]  # two points at one progress: a step down at 50%
    assert schedule_weight(step, 0.49) == 1.0 and schedule_weight(step, 0.5) == 0.0 and schedule_weight(step, 0.7) == 0.0


def test_schedule_multiplies_the_static_weight():
    weights = effective_loss_weights({"a": 2.0, "b": 0.5}, {"a": RAMP, "c": [[0, 4.0]]}, 0.45)
    assert weights == pytest.approx({"a": 1.0, "b": 0.5, "c": 4.0})  # a: 2 * 0.5; c: 1 * 4
    assert training_progress(0, 40) == 0.0 and training_progress(30, 40) == 0.75


def test_the_seed_curriculum_loads_from_yaml(tmp_path):
    # Private branches first; the shared bridge (contrastive alignment) opened from 30% to 60%;
    # alignment early, independence late.
    path = tmp_path / "curriculum.yaml"
    path.write_text(
        "train:\n"
        "  loss_weights: {hsic_private: 0.1}\n"
        "  loss_schedules:\n"
        "    contrastive_image_text: [[0, 0], [0.3, 0], [0.6, 1]]\n"
        "    vicreg_shared: [[0, 1], [0.5, 1], [1, 0.2]]\n"
        "    hsic_private: [[0, 0], [0.5, 0], [0.8, 1]]\n"
        "  gradient_surgery: {name: pcgrad, losses: [image_to_text, contrastive_image_text]}\n"
    )
    train = load_config(["tiny", str(path)]).train
    assert train.loss_schedules["contrastive_image_text"] == RAMP
    weights = effective_loss_weights(train.loss_weights, train.loss_schedules, 0.9)
    assert weights == pytest.approx({"contrastive_image_text": 1.0, "vicreg_shared": 0.36, "hsic_private": 0.1})


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.loss_schedules.x=[[0.5, 0], [0.3, 1]]", r"sorted by progress; 0.3 follows 0.5"),
        ("train.loss_schedules.x=[[0, -1]]", r"x\[0\]: weight -1 is negative"),
        ("train.loss_schedules.x=[0, 1]", r"x\[0\]: expected a \[progress, weight\] pair"),
        ("train.loss_schedules.x=[[0, 1, 2]]", r"x\[0\]: expected a \[progress, weight\] pair"),
        ("train.loss_schedules.x=[]", r"non-empty list"),
        ("train.loss_schedules.x=[[1.5, 1]]", r"outside \[0, 1\]"),
        ("train.loss_schedules.x=[[0, .nan]]", r"finite numbers"),
        ("tokenizer_train.loss_schedules.x=[[0, -1]]", r"tokenizer_train.loss_schedules.x\[0\]"),
    ],
)
def test_bad_schedules_fail_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["tiny"], [override])


def _train(**settings) -> Config:
    base = dict(steps=10, batch_size=8, lr=0.05, warmup_steps=0, log_every=1, ckpt_every=10, precision="fp32", progress=False)
    return Config(seed=0, device="cpu", train=TrainConfig(**{**base, **settings}))


def test_fit_weights_terms_by_schedule_logs_weights_and_tells_the_model(tmp_path, two_task):
    config = _train(loss_weights={"second": 0.5}, loss_schedules={"first": [[0, 0], [0.5, 2.0]]})
    model = two_task.model()
    fit(model, two_task.data(), two_task.collate, config, tmp_path)

    assert model.progress == pytest.approx([step / 10 for step in range(10)])
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for entry in entries:
        progress = (entry["step"] - 1) / 10  # the logged step is the one just taken
        first_weight = 4 * progress if progress < 0.5 else 2.0
        assert entry["weight/first"] == pytest.approx(first_weight)
        assert entry["weight/second"] == 0.5
        assert entry["progress"] == pytest.approx(progress)  # what the model read in its forward
        expected = first_weight * entry["loss/first"] + 0.5 * entry["loss/second"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-6)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/weight/first")] == pytest.approx([e["weight/first"] for e in entries])


def test_a_closed_term_gives_no_gradient(tmp_path, two_task):
    # While its schedule is at 0 the first head learns nothing (no weight decay here, so a zero
    # gradient leaves AdamW's update at 0), while the second head trains.
    model = two_task.model()
    config = _train(steps=4, weight_decay=0.0, loss_schedules={"first": [[0, 0]]})
    first, second = model.first.weight.detach().clone(), model.second.weight.detach().clone()
    fit(model, two_task.data(), two_task.collate, config, tmp_path)
    assert torch.equal(model.first.weight.detach(), first)
    assert not torch.equal(model.second.weight.detach(), second)
