"""Gradient surgery: PCGrad's projection by hand and against a loop written here, the whole step
against LibMTL's ``PCGrad`` (loaded without its torchvision-importing ``__init__``), GradNorm
evening out the training rates of two tasks whose losses differ 10x, accumulation 2x16 = 1x32
with surgery on, and exact resume (weights, logged figures, GradNorm state) with schedules on."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from nested import assert_same
from torch import nn

from polymodal.config import Config, TrainConfig, load_config
from polymodal.errors import ConfigError
from polymodal.models.output import StepOutput
from polymodal.training.gradient_surgery import PCGrad, build_gradient_surgery, pcgrad_project
from polymodal.training.loop import accumulate_gradients, fit

CPU = torch.device("cpu")


def test_pcgrad_projection_by_hand():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1: a conflict
    projected = pcgrad_project(torch.stack([g1, g2]))
    # g1 - (g1.g2)/|g2|^2 g2 = (1, 0) + (-1, 1)/2;  g2 - (g2.g1)/|g1|^2 g1 = (-1, 1) + (1, 0).
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    assert projected[0] @ g2 == 0 and projected[1] @ g1 == 0  # each is orthogonal to the other now
    agreeing = torch.tensor([[1.0, 0.2], [0.5, 1.0]])
    assert torch.equal(pcgrad_project(agreeing), agreeing)  # no conflict: left alone
    zero = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    assert torch.equal(pcgrad_project(zero), zero)  # a zero gradient neither conflicts nor divides by 0


def _pcgrad_reference(grads: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """Yu et al.'s Algorithm 1 in float64, visiting the others of row i in ``orders[i]``."""
    out = grads.copy()
    for i, order in enumerate(orders):
        for j in order:
            if j != i and out[i] @ grads[j] < 0:
                out[i] -= out[i] @ grads[j] / (grads[j] @ grads[j]) * grads[j]
    return out


def test_pcgrad_projection_equals_the_algorithm_on_four_terms():
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 50, generator=gen)
    grads[1] = -0.7 * grads[0] + 0.3 * grads[1]  # make sure some pairs conflict
    orders_gen = torch.Generator().manual_seed(7)
    orders = [torch.randperm(4, generator=orders_gen).tolist() for _ in range(4)]  # the draws pcgrad_project makes
    projected = pcgrad_project(grads, generator=torch.Generator().manual_seed(7))
    expected = _pcgrad_reference(grads.double().numpy(), orders)
    np.testing.assert_allclose(projected.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, grads.numpy())  # the projection did something


def _batch(two_task, n: int, *, seed: int = 0):
    data = two_task.data(n, seed=seed)
    return two_task.collate([data[i] for i in range(n)])


def _libmtl_pcgrad_grads(peer_module, model: nn.Module, batch) -> list[torch.Tensor]:
    """The gradients LibMTL's PCGrad leaves on ``model`` (shared parameters: the trunk)."""
    peer = peer_module("LibMTL.weighting.PCGrad").PCGrad()
    shared = list(model.trunk.parameters())
    peer.task_num, peer.device, peer.rep_grad = 2, CPU, False
    peer.get_share_params = lambda: shared
    peer.zero_grad_share_params = lambda: [p.grad.zero_() for p in shared if p.grad is not None]
    out = model(batch)
    peer.backward([out.losses["first"], out.losses["second"]])
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("seed, conflict", [(0, False), (1, True), (2, True)])  # at these seeds' initial weights
def test_pcgrad_step_equals_libmtl(peer_module, two_task, seed, conflict):
    torch.manual_seed(seed)
    model = two_task.model()
    peer_model = copy.deepcopy(model)
    batch = _batch(two_task, 32, seed=seed)
    surgery = PCGrad(model)
    out = accumulate_gradients(model, iter([batch]), num_batches=1, device=CPU, dtype=None, loss_weights={}, surgery=surgery)
    ours = [p.grad.clone() for p in model.parameters()]
    theirs = _libmtl_pcgrad_grads(peer_module, peer_model, batch)
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Where the trunk's two gradients conflict the surgery changes them, elsewhere it is the plain sum.
    assert out.metrics["pcgrad/conflicts"] == float(conflict)
    plain = copy.deepcopy(peer_model)
    plain.zero_grad(set_to_none=True)
    accumulate_gradients(plain, iter([batch]), num_batches=1, device=CPU, dtype=None, loss_weights={})
    same_trunk = torch.allclose(plain.trunk[0].weight.grad, model.trunk[0].weight.grad, rtol=1e-5, atol=1e-7)
    assert same_trunk is not conflict
    torch.testing.assert_close(plain.first.weight.grad, model.first.weight.grad)  # one term: plain gradient
    torch.testing.assert_close(plain.private.grad, model.private.grad)


@dataclasses.dataclass
class _Regression:
    x: torch.Tensor  # (B, 10)
    targets: list[torch.Tensor]  # one (B, 10) per task

    @property
    def size(self) -> int:
        return len(self.x)

    def to(self, device):
        return self


class _PaperToy(nn.Module):
    """Chen et al.'s toy (section 4): a shared ReLU trunk, one affine head per task, tasks
    y_i = sigma_i tanh((W + eps_i) x) that differ in scale sigma_i."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        layers = [nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(32, 10) for _ in range(num_tasks))

    def forward(self, batch: _Regression) -> StepOutput:
        hidden = self.trunk(batch.x)  # (B, 32)
        errors = {f"task{i}": (head(hidden) - y).square().mean() for i, (head, y) in enumerate(zip(self.heads, batch.targets))}
        return StepOutput(losses=errors)


def _train_paper_toy(spec: dict, *, steps: int = 400, seed: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """Train with SGD; return each task's held-out loss relative to its initial loss, and the last metrics."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, math.sqrt(10)])  # the second loss is 10x the first
    shared = torch.randn(10, 10, generator=gen)
    maps = [shared + 0.3 * torch.randn(10, 10, generator=gen) for _ in scales]

    def draw(n: int) -> _Regression:
        x = torch.randn(n, 10, generator=gen)
        return _Regression(x, [s * torch.tanh(x @ m) for s, m in zip(scales, maps)])

    held_out = draw(512)
    torch.manual_seed(seed)
    model = _PaperToy(len(scales))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    surgery = build_gradient_surgery(spec, model)

    def held_out_losses() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(list(model(held_out).losses.values()))

    initial = held_out_losses()
    for _ in range(steps):
        out = accumulate_gradients(model, iter([draw(64)]), num_batches=1, device=CPU, dtype=None, loss_weights={}, surgery=surgery)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return held_out_losses() / initial, out.metrics


@pytest.fixture(scope="module")
def plain_rates() -> torch.Tensor:
    return _train_paper_toy({"name": "none"})[0]


@pytest.mark.parametrize("layer", [None, "trunk.4"], ids=["all-shared", "last-shared-layer"])
def test_gradnorm_equalises_the_training_rates_of_tasks_10x_apart(plain_rates, layer):
    gradnorm_rates, metrics = _train_paper_toy({"name": "gradnorm", "layer": layer})
    # L_i(t) / L_i(0): without GradNorm the large task trains faster, 1.5x apart; GradNorm evens them.
    assert plain_rates.max() / plain_rates.min() > 1.4
    assert gradnorm_rates.max() / gradnorm_rates.min() < 1.1
    weights = torch.tensor([metrics["gradnorm/task0"], metrics["gradnorm/task1"]])
    assert weights.sum().item() == pytest.approx(2.0)  # renormalised to the number of tasks
    assert weights[0] > 3 * weights[1]  # the small task's gradient is scaled up to match


SPECS = [{"name": "pcgrad"}, {"name": "gradnorm", "alpha": 1.0, "lr": 0.5}, {"name": "gradnorm", "lr": 0.5, "layer": "trunk.0"}]
SPEC_IDS = ["pcgrad", "gradnorm", "gradnorm-layer"]


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_accumulated_2x16_equals_1x32_with_surgery(two_task, spec):
    whole = _batch(two_task, 32, seed=1)
    halves = [two_task.batch(whole.x[:16], whole.y[:16]), two_task.batch(whole.x[16:], whole.y[16:])]
    grads, states = [], []
    for batches in ([whole], halves):
        torch.manual_seed(1)
        model = two_task.model()
        surgery = build_gradient_surgery(spec, model)
        for _ in range(2):  # two steps, so the second uses GradNorm's updated weights
            model.zero_grad(set_to_none=True)
            accumulate_gradients(model, iter(batches), num_batches=len(batches), device=CPU, dtype=None,
                                 loss_weights={"second": 0.5}, surgery=surgery)  # fmt: skip
        grads.append([p.grad.clone() for p in model.parameters()])
        states.append(surgery.state_dict())
    for one, two in zip(*grads):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    if spec["name"] == "gradnorm":
        torch.testing.assert_close(states[0]["weights"], states[1]["weights"], rtol=1e-5, atol=1e-6)
    # The check has teeth: the first half alone gives other gradients.
    torch.manual_seed(1)
    model = two_task.model()
    accumulate_gradients(model, iter(halves[:1]), num_batches=1, device=CPU, dtype=None, loss_weights={},
                         surgery=build_gradient_surgery(spec, model))  # fmt: skip
    assert not torch.allclose(model.trunk[0].weight.grad, grads[0][0], atol=1e-4)


class _Interrupt(Exception):
    """Stands in for a crash between two checkpoints."""


def _read_entries(run_dir) -> list[dict]:
    volatile = ("time", "samples_per_s", "mfu")  # timings
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in volatile} for line in lines]


@pytest.mark.parametrize("spec", [{"name": "pcgrad", "seed": 3}, {"name": "gradnorm", "lr": 0.2}], ids=["pcgrad", "gradnorm"])
def test_resume_with_surgery_and_schedules_is_exact(tmp_path, two_task, spec):
    train = TrainConfig(
        steps=12, batch_size=6, grad_accum=2, lr=0.05, warmup_steps=2, log_every=1, ckpt_every=4, keep_checkpoints=0,
        eval_every=6, precision="fp32", progress=False, gradient_surgery=spec,
        loss_schedules={"first": [[0, 0.2], [0.5, 1.0]], "second": [[0, 1.0], [1.0, 0.3]]},
    )  # fmt: skip
    config = Config(seed=4, device="cpu", train=train)

    def run(run_dir, *, resume: bool = False, stop_at: int | None = None) -> nn.Module:
        def evaluate(model, step):
            if step == stop_at:
                raise _Interrupt
            return {"draw": torch.rand(()).item()}  # the global RNG must be replayed too

        torch.manual_seed(0)
        model = two_task.model(dropout=0.3, agreement=True)
        fit(model, two_task.data(), two_task.collate, config, run_dir, resume=resume, evaluate=evaluate)
        return model

    whole = run(tmp_path / "whole")
    with pytest.raises(_Interrupt):
        run(tmp_path / "resumed", stop_at=6)  # after step 6 was logged; the last checkpoint is step 4
    resumed = run(tmp_path / "resumed", resume=True)

    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    assert _read_entries(tmp_path / "resumed") == _read_entries(tmp_path / "whole")
    assert resumed.progress == [step / 12 for step in range(4, 12)]  # the resumed steps' progress
    final = "checkpoints/step_0000012/state.pt"
    saved = [torch.load(tmp_path / run / final, weights_only=True)["extra"]["gradient_surgery"] for run in ("whole", "resumed")]
    assert_same(saved[0], saved[1])
    if spec["name"] == "gradnorm":
        entry = [e for e in _read_entries(tmp_path / "whole") if e["split"] == "train"][-1]
        assert entry["gradnorm/first"] != 1.0 and entry["weight/first"] == 1.0 and entry["weight/second"] < 1


def test_surgery_specs_are_checked_at_config_load():
    config = load_config(["tiny"], ["train.gradient_surgery={name: gradnorm, alpha: 0.5, losses: [image_to_text]}"])
    assert config.train.gradient_surgery == {"name": "gradnorm", "alpha": 0.5, "losses": ["image_to_text"]}
    for override, message in [
        ("train.gradient_surgery={name: pcgard}", r"unknown gradient surgery 'pcgard'; valid: none, gradnorm, pcgrad"),
        ("train.gradient_surgery={name: pcgrad, alpha: 1}", r"train.gradient_surgery.alpha: unknown setting .* valid: losses, seed"),
        ("train.gradient_surgery={name: gradnorm, alpha: fast}", r"train.gradient_surgery.alpha: 'fast' is not a valid float"),
        ("train.gradient_surgery={name: none, alpha: 1}", r"'none' takes no settings"),
        ("train.gradient_surgery=pcgrad", r"expected a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(["tiny"], [override])


@pytest.mark.parametrize("name", ["pcgrad", "gradnorm"])
def test_surgery_trains_under_bf16_autocast_with_clipping(tmp_path, two_task, name):
    train = TrainConfig(
        steps=30, batch_size=16, lr=0.03, warmup_steps=0, log_every=1, ckpt_every=30, grad_clip=0.5,
        precision="bf16", progress=False, gradient_surgery={"name": name},
    )  # fmt: skip
    torch.manual_seed(0)
    model = two_task.model()
    fit(model, two_task.data(), two_task.collate, Config(seed=0, device="cpu", train=train), tmp_path)
    entries = _read_entries(tmp_path)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert entries[-1]["loss"] < 0.3 * entries[0]["loss"]
    assert max(e["grad_norm"] for e in entries) > 0.5  # clipping had work to do


def test_a_term_weighted_0_is_left_out_of_the_surgery(two_task):
    model = two_task.model()
    surgery = build_gradient_surgery({"name": "pcgrad"}, model)
    out = accumulate_gradients(model, iter([_batch(two_task, 16)]), num_batches=1, device=CPU, dtype=None,
                               loss_weights={"first": 0.0}, surgery=surgery)  # fmt: skip
    assert model.first.weight.grad is None and model.private.grad is None  # never differentiated
    assert "pcgrad/conflicts" not in out.metrics  # one term left: nothing is shared
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    accumulate_gradients(plain, iter([_batch(two_task, 16)]), num_batches=1, device=CPU, dtype=None, loss_weights={"first": 0.0})
    torch.testing.assert_close(plain.trunk[0].weight.grad, model.trunk[0].weight.grad)


@pytest.mark.parametrize("spec", SPECS[1:], ids=SPEC_IDS[1:])
def test_gradnorm_gradient_is_the_sum_weighted_by_its_learned_weights(two_task, spec):
    # After one step the weights have moved; the second step's gradient must equal the plain
    # path's with those weights as loss weights (times the static weight of "second").
    batch = _batch(two_task, 16, seed=3)
    torch.manual_seed(2)
    model = two_task.model()
    plain = copy.deepcopy(model)
    surgery = build_gradient_surgery(spec, model)
    static = {"second": 0.5}
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        learned = dict(zip(surgery.names, surgery.state_dict()["weights"].tolist()))
        accumulate_gradients(model, iter([batch]), num_batches=1, device=CPU, dtype=None, loss_weights=static, surgery=surgery)
    assert learned["first"] != 1.0
    combined = {name: learned[name] * static.get(name, 1.0) for name in learned}
    accumulate_gradients(plain, iter([batch]), num_batches=1, device=CPU, dtype=None, loss_weights=combined)
    for ours, reference in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_gradnorm_layer_must_name_parameters(two_task):
    with pytest.raises(ConfigError, match=r"no trainable parameter is named 'trunk.9'.*e.g. "):
        build_gradient_surgery({"name": "gradnorm", "layer": "trunk.9"}, two_task.model())
    trunk_only = build_gradient_surgery({"name": "gradnorm", "layer": "trunk"}, two_task.model())
    assert len(trunk_only.collected.params) == 2  # everything under trunk: trunk.0.weight, trunk.0.bias
