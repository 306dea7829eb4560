"""The training loop on a toy regression: it learns, leaves a complete run folder, accumulates
gradients like one large batch, weights loss terms, fails clearly, logs MFU from the counted first
step; and the precision policy."""

import dataclasses
import json
import sys
import threading
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import Dataset

import polymodal.training.step_record as step_record
from polymodal.config import Config, TrainConfig
from polymodal.models.output import StepOutput
from polymodal.training.checkpoint import CheckpointError
from polymodal.training.loop import FitResult, accumulate_gradients, fit
from polymodal.training.metrics_log import MetricsLogger
from polymodal.training.mfu import matmul_peak
from polymodal.training.precision import autocast, cpu_runs_bf16_fast, resolve_precision

sys.path.insert(0, str(Path(__file__).parent))  # toy.py beside this file
from toy import Batch as ToyBatch  # noqa: E402

CPU = torch.device("cpu")


class ToyData(Dataset):
    """y = x . w + 0.5 with a little noise."""

    def __init__(self, n: int = 96) -> None:
        gen = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5 + 0.01 * torch.randn(n, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class ToyCollate:
    num_skipped = 0  # like the real collator's count of dropped samples

    def __call__(self, items):
        return ToyBatch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch: ToyBatch) -> StepOutput:
        pred = self.linear(batch.x).squeeze(-1)  # (B, 4) -> (B,)
        err = pred - batch.y
        losses = {"mse": err.square().mean(), "l1": err.abs().mean()}
        return StepOutput(losses=losses, metrics={"bias": self.linear.bias.item()})


def _config(**train) -> Config:
    settings = dict(
        steps=40, batch_size=16, lr=0.3, warmup_steps=2, log_every=5, ckpt_every=20, precision="fp32", progress=False
    )
    settings.update(train)
    return Config(seed=0, device="cpu", train=TrainConfig(**settings))


def _model(seed: int = 0) -> Regression:
    torch.manual_seed(seed)
    return Regression()


def _read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fit_learns_and_leaves_a_complete_run_folder(tmp_path):
    evaluated = []

    def evaluate(model, step):
        evaluated.append((step, model.training, torch.is_grad_enabled()))
        return {"mse": float(model.linear.bias.detach().abs())}

    result = fit(_model(), ToyData(), ToyCollate(), _config(eval_every=20), tmp_path, evaluate=evaluate)

    assert isinstance(result, FitResult) and result.step == 40 and result.samples_per_second > 0
    entries = _read_metrics(tmp_path)
    train = [e for e in entries if e["split"] == "train"]
    assert [e["step"] for e in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < 0.05 * train[0]["loss"]
    assert result.losses["loss"] == pytest.approx(train[-1]["loss"])
    assert {"loss/mse", "loss/l1", "bias", "lr", "grad_norm", "samples_per_s", "mfu", "skipped_samples"} <= set(train[0])
    assert [(e["step"], e["split"]) for e in entries if e["split"] == "val"] == [(20, "val"), (40, "val")]
    assert evaluated == [(20, False, False), (40, False, False)]  # eval mode, no grad

    # TensorBoard holds the same scalars as metrics.jsonl.
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_loss == pytest.approx({e["step"]: e["loss"] for e in train}, rel=1e-6)
    assert "val/mse" in events.Tags()["scalars"]

    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000020", "step_0000040"]
    assert (ckpts / "latest").read_text().strip() == "step_0000040"
    assert (tmp_path / "config.yaml").is_file()


def test_total_loss_is_the_weighted_sum_of_terms(tmp_path):
    config = _config(steps=5, log_every=1, loss_weights={"mse": 2.0, "l1": 0.5})
    fit(_model(), ToyData(), ToyCollate(), config, tmp_path)
    for entry in _read_metrics(tmp_path):
        assert entry["loss"] == pytest.approx(2.0 * entry["loss/mse"] + 0.5 * entry["loss/l1"], rel=1e-6)


def test_a_loss_weight_naming_no_loss_is_warned_about_once(tmp_path, caplog):
    config = _config(steps=3, log_every=1, loss_weights={"mse": 2.0, "l2": 0.5})  # "l2": a typo of "l1"
    with caplog.at_level("WARNING", logger="polymodal.training.loop"):
        fit(_model(), ToyData(), ToyCollate(), config, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "'l2'" in warnings[0] and "l1, mse" in warnings[0]


def test_accumulated_gradient_equals_one_big_batch():
    data, collate = ToyData(32), ToyCollate()
    big = collate([data[i] for i in range(32)])
    halves = [collate([data[i] for i in range(16)]), collate([data[i] for i in range(16, 32)])]
    grads = []
    for batches in ([big], halves):
        model = _model()
        out = accumulate_gradients(
            model, iter(batches), num_batches=len(batches), device=CPU, dtype=None, loss_weights={}
        )
        grads.append([p.grad.clone() for p in model.parameters()])
        assert out.num_samples == 32
    for one, two in zip(*grads):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    # The check has teeth: the first half alone gives another gradient.
    model = _model()
    accumulate_gradients(model, iter(halves[:1]), num_batches=1, device=CPU, dtype=None, loss_weights={})
    assert not torch.allclose(model.linear.weight.grad, grads[0][0], atol=1e-3)


def test_grad_accum_2x16_trains_like_1x32(tmp_path):
    weights = []
    for batch_size, accum in ((32, 1), (16, 2)):
        model = _model()
        config = _config(steps=3, batch_size=batch_size, grad_accum=accum)
        fit(model, ToyData(), ToyCollate(), config, tmp_path / f"{accum}")
        weights.append(model.state_dict())
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)


def test_resume_needs_a_checkpoint_and_fresh_start_refuses_an_old_run(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        fit(_model(), ToyData(), ToyCollate(), _config(steps=2), tmp_path, resume=True)
    fit(_model(), ToyData(), ToyCollate(), _config(steps=2), tmp_path)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        fit(_model(), ToyData(), ToyCollate(), _config(steps=2), tmp_path)


def test_precision_policy():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("auto", CPU) == (torch.bfloat16 if cpu_runs_bf16_fast() else None)
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    with autocast(CPU, None):
        assert (a @ b).dtype == torch.float32
    with autocast(CPU, torch.bfloat16):
        low = a @ b
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), a @ b, rtol=2e-2, atol=2e-2)


def test_bf16_autocast_training_keeps_fp32_master_weights(tmp_path):
    model = _model()
    result = fit(model, ToyData(), ToyCollate(), _config(steps=30, precision="bf16"), tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    first = _read_metrics(tmp_path)[0]["loss"]
    assert result.losses["loss"] < 0.2 * first


def test_metrics_logger_images_and_reserved_names(tmp_path):
    image = torch.arange(5 * 7 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(5, 7, 3)  # (H, W, C)
    with MetricsLogger(tmp_path) as logger:
        logger.log_image("val/sample", image, step=3)
        with pytest.raises(ValueError, match=r"\(H, W, C\) uint8"):
            logger.log_image("val/bad", image.float(), step=3)
        with pytest.raises(ValueError, match="reserved"):
            logger.log(1, {"time": 1.0})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    (stored,) = events.Images("val/sample")
    assert (stored.step, stored.height, stored.width) == (3, 5, 7)


def test_fit_logs_mfu_from_the_counted_first_step(tmp_path):
    """Every logged MFU is the first step's counted FLOPs per sample times that window's samples/s
    over the fp32 peak: the toy model's Linear(4, 1) costs 2·4 FLOPs per sample forward and 2·4 for
    its weight gradient (its input needs none)."""
    result = fit(_model(), ToyData(), ToyCollate(), _config(steps=10, log_every=2), tmp_path)
    peak = matmul_peak(torch.float32, "cpu")
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for entry in entries:
        assert entry["mfu"] == pytest.approx(16 * entry["samples_per_s"] / peak, rel=1e-9)
    assert result.mfu == pytest.approx(16 * result.samples_per_second / peak, rel=1e-9)


def test_a_resumed_run_reports_mfu_from_the_checkpoint_without_counting_again(tmp_path, monkeypatch):
    """The FLOP count of a fresh run's first step travels in its checkpoints: the resumed process
    counts nothing (a counting dispatch mode would change its kernels and so its rounding) and
    still reports the same FLOPs per sample."""
    fit(_model(), ToyData(), ToyCollate(), _config(steps=4, log_every=2, ckpt_every=2), tmp_path)
    import polymodal.training.loop as loop

    counted = []
    real = loop.counting
    monkeypatch.setattr(loop, "counting", lambda enabled=True: counted.append(enabled) or real(enabled))
    result = fit(_model(), ToyData(), ToyCollate(), _config(steps=8, log_every=2, ckpt_every=2), tmp_path, resume=True)
    assert counted and not any(counted)
    peak = matmul_peak(torch.float32, "cpu")
    assert result.mfu == pytest.approx(16 * result.samples_per_second / peak, rel=1e-9)


def test_prefetching_batches_ahead_trains_exactly_as_collating_in_step(tmp_path):
    """train.prefetch=2 (a background thread collates ahead) and 0 (collation in the step): the same
    batches in the same order, so bitwise the same weights and logged losses."""
    weights, losses = [], []
    for depth in (0, 2):
        model = _model()
        config = _config(steps=9, log_every=3)
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, prefetch=depth))
        result = fit(model, ToyData(), ToyCollate(), config, tmp_path / f"prefetch{depth}")
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        losses.append(result.losses)
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert losses[0] == losses[1]


def test_the_mfu_peak_is_timed_before_the_prefetch_thread_collates(tmp_path, monkeypatch):
    """The matmul peak behind MFU is probed while no collation thread shares the cores, which would
    read the peak low and every logged MFU high."""
    threads_at_probe = []

    def probe(dtype, device):
        threads_at_probe.append([t.name for t in threading.enumerate()])
        return 1e9

    monkeypatch.setattr(step_record, "matmul_peak", probe)
    config = _config(steps=3, log_every=1)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, prefetch=2))
    fit(_model(), ToyData(), ToyCollate(), config, tmp_path / "run")
    assert len(threads_at_probe) == 1 and "polymodal-prefetch" not in threads_at_probe[0]


def test_a_long_fit_probes_the_peak_again_and_reports_against_the_better_reading(tmp_path, monkeypatch):
    """The first probe read half the peak (as on a shared host); a fit past REPROBE_AFTER_SECONDS
    probes again at its end, and its result's MFU is against the better reading. The logged
    windows keep the first probe's."""
    calls = []

    def probe(dtype, device, again=False):
        calls.append(again)
        return 2e9 if again else 1e9

    monkeypatch.setattr(step_record, "matmul_peak", probe)
    monkeypatch.setattr(step_record, "REPROBE_AFTER_SECONDS", 0.0)
    result = fit(_model(), ToyData(), ToyCollate(), _config(steps=4, log_every=2), tmp_path)
    assert calls == [False, True]
    assert result.mfu == pytest.approx(16 * result.samples_per_second / 2e9, rel=1e-9)
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(entry["mfu"] == pytest.approx(16 * entry["samples_per_s"] / 1e9, rel=1e-9) for entry in entries)
