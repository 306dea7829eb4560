"""What a training run measures and writes after each step: the progress bar, throughput (items
per second overall and per logging window), MFU, and the logged values (``metrics.jsonl`` and
TensorBoard through ``MetricsLogger``); and the result of a ``fit`` call."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from polymodal.config import TrainConfig
from polymodal.distributed.collectives import sum_over_ranks
from polymodal.distributed.process import is_main
from polymodal.training.metrics_log import MetricsLogger, NullMetricsLogger
from polymodal.training.mfu import MFUMeter, matmul_peak

if TYPE_CHECKING:
    from polymodal.training.loop import AccumulatedStep, TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        step: optimiser steps done in total (``train.steps`` when the run completes).
        losses: the last step's ``loss`` (weighted total) and each unweighted term by name.
        wall_seconds: time spent in this call.
        samples_per_second: items trained per second in this call.
        mfu: model FLOPs utilisation over this call (see :mod:`polymodal.training.mfu`).
    """

    step: int
    losses: dict[str, float]
    wall_seconds: float
    samples_per_second: float
    mfu: float = 0.0


def step_values(
    out: AccumulatedStep, losses: dict[str, float], *, lr: float, grad_norm: float, samples_per_s: float,
    mfu: float, skipped: int | None,
) -> dict[str, float]:
    """What a logged step records: the total and every term with its weight, the model's metrics, lr,
    grad norm, throughput, MFU and (when the collator counts them) the damaged samples skipped so far."""
    values = {"loss": losses["loss"], **{f"loss/{name}": v for name, v in losses.items() if name != "loss"}}
    values.update({f"weight/{name}": weight for name, weight in out.weights.items()})
    values.update(out.metrics)
    values.update(lr=lr, grad_norm=grad_norm, samples_per_s=samples_per_s, mfu=mfu)
    if skipped is not None:
        values["skipped_samples"] = float(skipped)
    return values


REPROBE_AFTER_SECONDS = 60.0  # a probe (about 0.5 s) is under 1% of a fit this long


@dataclasses.dataclass
class StepRecorder:
    """What a :func:`fit` call measures and writes after each step: the progress bar, throughput,
    MFU and the logged values (``metrics.jsonl`` / TensorBoard)."""

    logger: MetricsLogger
    bar: tqdm
    throughput: Throughput
    mfu: MFUMeter
    counts_skips: bool
    precision: tuple[torch.dtype, str]  # the matmuls' dtype and device, whose peak MFU is against

    @classmethod
    def start(cls, run_dir: Path, state: TrainState, train: TrainConfig, *, resume: bool, counts_skips: bool) -> StepRecorder:
        bar = tqdm(total=train.steps, initial=state.step, disable=not (train.progress and is_main()), file=sys.stderr,
                   unit="step", dynamic_ncols=True)  # fmt: skip
        precision = (state.dtype or torch.float32, str(state.device))
        peak = matmul_peak(*precision)
        # Rank 0 of a data-parallel run writes the logs; the others log nothing.
        logger = MetricsLogger(run_dir, resume_step=state.step if resume else None) if is_main() else NullMetricsLogger()
        meter = MFUMeter(peak)
        meter.flops_per_sample = state.flops_per_sample  # a resumed run's, from its checkpoint
        return cls(logger, bar, Throughput(), meter, counts_skips, precision)

    def step(
        self, step: int, out: AccumulatedStep, losses: dict[str, float], *, lr: float, grad_norm: float, skipped: int,
        skipped_steps: int, log: bool,
    ) -> None:
        """Count the step; when ``log``, write its values (this rank's samples/s and MFU over the
        window, the damaged samples skipped by every rank and the non-finite steps skipped so far)."""
        self.throughput.add(out.num_samples)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{losses['loss']:.4f}", samples_s=f"{self.throughput.overall():.0f}")
        if log:
            skipped = int(sum_over_ranks(torch.tensor(skipped, device=out.total.device)))
            rate = self.throughput.window()
            values = step_values(
                out, losses, lr=lr, grad_norm=grad_norm, samples_per_s=rate, mfu=self.mfu.mfu(rate),
                skipped=skipped if self.counts_skips else None,
            )
            self.logger.log(step, {**values, "skipped_steps": skipped_steps})

    def close(self) -> None:
        self.bar.close()
        self.logger.close()

    def result(self, step: int, losses: dict[str, float]) -> FitResult:
        """The call's result; its throughput and MFU also go to the log. A call of at least
        ``REPROBE_AFTER_SECONDS`` probes the peak again first and keeps the better reading: the first
        probe can read low on a shared host (``training/mfu.py``)."""
        seconds, rate = self.throughput.seconds(), self.throughput.overall()
        if seconds >= REPROBE_AFTER_SECONDS:
            self.mfu.peak = matmul_peak(*self.precision, again=True)
        result = FitResult(step, losses, seconds, rate, self.mfu.mfu(rate))
        log.info(
            "at step %d after %.0f s: %.1f samples/s, MFU %.1f%% (%.2f GFLOP per sample, peak %.1f GFLOP/s)",
            step, result.wall_seconds, rate, 100 * result.mfu, self.mfu.flops_per_sample / 1e9, self.mfu.peak / 1e9,
        )
        return result


class Throughput:
    """Items per second since the start of a :func:`fit` call, and since the last logged step."""

    def __init__(self) -> None:
        self.start = self.window_start = time.perf_counter()
        self.samples = self.window_samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples
        self.window_samples += samples

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def overall(self) -> float:
        return self.samples / max(self.seconds(), 1e-9)

    def window(self) -> float:
        """The rate since the previous call (or the start), and a new window from now."""
        now = time.perf_counter()
        rate = self.window_samples / max(now - self.window_start, 1e-9)
        self.window_start, self.window_samples = now, 0
        return rate
