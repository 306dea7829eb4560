"""The training loop: AdamW + warmup-cosine, gradient accumulation, clipping, autocast, logging,
atomic checkpoints and exact resume (a run killed and resumed ends with the same weights, bitwise on
CPU fp32, as one never interrupted). Kept flat and readable in the manner of Karpathy's nanoGPT.

A step whose loss or gradient is not finite updates nothing (``nonfinite.py``); SIGINT and SIGTERM
end the run after a checkpoint of the step under way (``interrupt.py``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from polymodal.config import Config, TrainConfig, dump_config
from polymodal.distributed.collectives import any_rank, mean_over_ranks
from polymodal.distributed.data_parallel import data_parallel, gradient_sync
from polymodal.distributed.fsdp import ShardedModel, gathered, save_sharded_checkpoint, start_sharding
from polymodal.distributed.global_mean import global_means
from polymodal.distributed.process import is_main, rank, resolve_device, world_size
from polymodal.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, step_folder
from polymodal.training.checkpoint_check import resumable_checkpoint
from polymodal.training.compile import compiled_blocks
from polymodal.training.gradient_surgery import GradientSurgery, build_gradient_surgery
from polymodal.training.interrupt import StopOnSignal
from polymodal.training.metrics_log import MetricsLogger
from polymodal.training.mfu import counting
from polymodal.training.nonfinite import NonFiniteGuard
from polymodal.training.optim import build_optimizer, build_scheduler
from polymodal.training.precision import autocast, resolve_precision
from polymodal.training.sampler import CountedCollate, Prefetcher, build_loader
from polymodal.training.schedules import effective_loss_weights, set_model_progress, training_progress
from polymodal.training.step_record import FitResult, StepRecorder

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module, int], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class AccumulatedStep:
    """The losses of one optimiser step, averaged over its micro-batches (all detached).

    Attributes:
        total: () the weighted sum of the terms, whose gradient now sits in ``.grad``.
        terms: each unweighted () loss term by name.
        metrics: the model's metrics by name (and the gradient surgery's, when one is on).
        num_samples: items in the micro-batches.
        weights: the weight each term had in ``total`` (static weight times schedule).
    """

    total: Tensor
    terms: dict[str, Tensor]
    metrics: dict[str, float]
    num_samples: int
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int,
    device: torch.device,
    dtype: torch.dtype | None,
    loss_weights: Mapping[str, float],
    surgery: GradientSurgery | None = None,
) -> AccumulatedStep:
    """Forward and backward over ``num_batches`` micro-batches, leaving in ``.grad`` the gradient of
    the mean over micro-batches of ``sum(loss_weights.get(name, 1) * term)``: with mean-reduced
    losses, 2 micro-batches of 16 give the gradient of one batch of 32. With a ``surgery``, each
    weighted term is differentiated on its own and the surgery combines the step's per-term
    gradients into ``.grad`` (see :mod:`polymodal.training.gradient_surgery`). An empty micro-batch
    (all its samples failed to load) adds nothing; when all are empty the total is NaN and no
    gradient exists. A data-parallel ``model`` averages gradients over ranks after the last
    micro-batch, of terms weighed so that a mean over tokens is the mean over every rank's tokens.
    """
    total, terms, metrics, num_samples = torch.zeros((), device=device), {}, {}, 0
    for index, batch in enumerate(itertools.islice(batches, num_batches)):
        if batch.size == 0:  # every sample failed to load (the collator counted them): nothing to learn
            continue
        num_samples += batch.size
        batch = batch.to(device)
        with gradient_sync(model, last=index == num_batches - 1):
            with autocast(device, dtype):
                out = model(batch)
            if not out.losses:
                raise ValueError(
                    f"{type(model).__name__}.forward returned no losses; StepOutput.losses must name at least one"
                )
            weighed = global_means(out.losses, out.counts)  # over ranks: each term's mean over every rank's tokens
            loss = sum(loss_weights.get(name, 1.0) * term.float() for name, term in weighed.items())
            if surgery is None:
                (loss / num_batches).backward()
            else:
                surgery.backward(weighed, loss_weights, scale=1.0 / num_batches)
        total = total + loss.detach() / num_batches
        for name, term in out.losses.items():
            terms[name] = terms.get(name, 0.0) + term.detach().float() / num_batches
        for name, value in out.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + float(value) / num_batches
    if num_samples == 0:  # no loss at all: a NaN total makes the guard skip the update and say why
        total = torch.full((), math.nan, device=device)
    elif surgery is not None:
        metrics.update(surgery.apply())
    weights = {name: float(loss_weights.get(name, 1.0)) for name in terms}
    return AccumulatedStep(total, terms, metrics, num_samples, weights)


def warn_unused_loss_weights(loss_weights: Mapping[str, float], names: Iterable[str]) -> None:
    """Log a warning for each ``train.loss_weights`` or ``loss_schedules`` key the model's first step
    did not produce (a misspelt name would otherwise leave its loss at weight 1 without a word). A
    warning, not an error: a loss can be missing from one step (a task whose modality a batch lacks)
    and present in the next.
    """
    names = sorted(names)
    for name in sorted(set(loss_weights) - set(names)):
        log.warning(
            "train.loss_weights/loss_schedules name %r, which the first step did not produce; its losses: %s",
            name, ", ".join(names),
        )


@dataclasses.dataclass
class TrainState:
    """Where a :func:`fit` call stands: the optimiser, its schedule, and how far training went.

    Attributes:
        guard: skips the update of a step whose loss or gradient is not finite, and counts it.
        step: optimiser steps taken (skipped ones included).
        position: items consumed from the data stream, by every rank (the sampler resumes there).
        surgery: the gradient surgery (its state is checkpointed), or None for the plain sum.
        sharded: with ``train.fsdp`` over several ranks, what sharding left to the loop; else None.
        flops_per_sample: counted in a fresh run's first step (for MFU) and kept in checkpoints.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    guard: NonFiniteGuard
    step: int = 0
    position: int = 0
    surgery: GradientSurgery | None = None
    sharded: ShardedModel | None = None
    flops_per_sample: float = 0.0

    def save(self, run_dir: Path, model: nn.Module, *, keep: int) -> Path:
        """A checkpoint of the model and of this state (the data position, the skip counts and the
        gradient surgery's state with it). Every rank calls it; rank 0 writes (each rank its own shards
        under FSDP); every rank returns the checkpoint's folder.

        Raises:
            RunError: the weights are not finite (nothing is written), or the write failed.
        """
        self.guard.check_weights(model, step=self.step)
        extra = {"data_position": self.position, "flops_per_sample": self.flops_per_sample, **self.guard.state_dict()}
        if self.surgery is not None:
            extra["gradient_surgery"] = self.surgery.state_dict()
        if self.sharded is not None:
            return save_sharded_checkpoint(run_dir, step=self.step, model=model, optimizer=self.optimizer,
                                           scheduler=self.scheduler, extra_state=extra, keep=keep)  # fmt: skip
        if not is_main():
            return step_folder(run_dir, self.step)  # where rank 0 writes it
        return save_checkpoint(
            run_dir, step=self.step, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
            extra_state=extra, keep=keep,
        )


def start_state(model: nn.Module, config: Config, run_dir: Path, *, resume: bool) -> TrainState:
    """Seed everything and move ``model`` to its device; a fresh optimiser and schedule, or those of
    the newest whole checkpoint (with the RNGs) on resume. The resolved config goes to ``run_dir/config.yaml``."""
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model.to(device)  # master weights stay fp32; autocast runs eligible forward ops in bf16
    sharded = start_sharding(model, config.train)  # before the optimiser, which then holds the shards
    optimizer = build_optimizer(model, config.train)
    state = TrainState(
        optimizer, build_scheduler(optimizer, config.train), device, resolve_precision(config.train.precision, device),
        NonFiniteGuard(config.train.max_nonfinite_steps, run_dir),
        surgery=build_gradient_surgery(config.train.gradient_surgery, model), sharded=sharded,
    )
    if resume:
        found = resumable_checkpoint(run_dir)  # damaged newer checkpoints are moved aside, with a warning
        if found is None:
            raise CheckpointError(f"resume: no checkpoint in {run_dir / 'checkpoints'} is whole; start without resuming")
        saved = load_checkpoint(found, model=model, optimizer=optimizer, scheduler=state.scheduler, restore_rng=True)
        state.guard.load_state_dict(saved)
        state.step = saved["step"]
        state.position = saved.get("data_position", state.step * config.train.batch_size * config.train.grad_accum * world_size())
        state.flops_per_sample = saved.get("flops_per_sample", 0.0)
        if state.surgery is not None:
            if "gradient_surgery" not in saved:
                raise CheckpointError(f"{found} was saved without gradient surgery; resume with the run's own config")
            state.surgery.load_state_dict(saved["gradient_surgery"])
    elif latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints; resume it, or train into a new run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        dump_config(config, run_dir / "config.yaml")
    return state


def optimizer_step(
    model: nn.Module, state: TrainState, batches: Iterator[Any], train: TrainConfig
) -> tuple[AccumulatedStep, dict[str, float], float]:
    """One optimiser step over ``train.grad_accum`` micro-batches: gradients, clipping, update.
    Before it, every sub-module of ``model`` that defines ``set_progress(fraction)`` is called with
    the fraction of ``train.steps`` done (0 at the first step), which also drives the loss schedules.
    A non-finite loss or gradient skips the update (the schedule still advances; ``nonfinite.py``).

    Returns:
        the accumulated step, the losses by name (``loss`` the weighted total) and the gradient
        norm before clipping.

    Raises:
        RunError: the ``train.max_nonfinite_steps``-th non-finite step in a row.
    """
    progress = training_progress(state.step, train.steps)
    set_model_progress(model, progress)
    out = accumulate_gradients(
        model, batches, num_batches=train.grad_accum, device=state.device, dtype=state.dtype,
        loss_weights=effective_loss_weights(train.loss_weights, train.loss_schedules, progress), surgery=state.surgery,
    )
    if state.sharded is not None:
        state.sharded.average_gradients()  # the parameters FSDP left whole
    terms = {name: term.item() for name, term in out.terms.items()}
    losses = {**terms, "loss": mean_over_ranks(out.total).item()}  # one total on every rank: one guard decision
    max_norm = train.grad_clip if train.grad_clip > 0 else math.inf  # inf: measure the norm, never clip
    # The norm first, clipping after the guard: a non-finite gradient is named before clipping smears it.
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    grad_norm = norm.item()
    if state.guard.allows_update(losses, grad_norm, step=state.step + 1, model=model):
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
        state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.position += train.batch_size * train.grad_accum * world_size()
    return out, losses, grad_norm


def data_stream(
    dataset: Dataset, collate_fn: Callable[[list[Any]], Any], config: Config, state: TrainState
) -> Prefetcher:
    """Batches in the run's seeded order from the item ``state`` reached (exact resume), collated
    ``train.prefetch`` ahead in a background thread; its ``num_skipped`` counts damaged samples."""
    loader = build_loader(
        dataset, CountedCollate(collate_fn), batch_size=config.train.batch_size, seed=config.seed, start=state.position,
        num_workers=config.data.num_workers, pin_memory=state.device.type == "cuda", rank=rank(), world_size=world_size(),
    )
    return Prefetcher(iter(loader), depth=config.train.prefetch)


def fit(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any],
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    evaluate: Evaluate | None = None,
    diagnose: Callable[[nn.Module, int, MetricsLogger], None] | None = None,
    should_stop: Callable[[int], bool] | None = None,
) -> FitResult:
    """Train ``model`` for ``config.train.steps`` optimiser steps, writing logs and checkpoints to ``run_dir``.

    Args:
        model: ``forward(batch)`` returns a :class:`polymodal.models.output.StepOutput`.
        dataset: items for ``collate_fn``; visited in a seeded order, one permutation per epoch.
        collate_fn: list of items -> a batch with ``.to(device)`` and ``.size``; its ``num_skipped``
            (damaged samples dropped) is logged when it has one. Batches are collated
            ``train.prefetch`` ahead in a background thread.
        config: reads ``seed``, ``device``, ``data.num_workers`` and ``train``.
        run_dir: the run folder: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``.
        resume: continue exactly from the newest whole checkpoint in ``run_dir`` (weights,
            optimiser, scheduler, RNGs, data position, gradient surgery state).
        evaluate: ``evaluate(model, step) -> {name: value}``, called under ``no_grad`` in eval mode
            every ``train.eval_every`` steps (if > 0) and at the end, on every rank; logged as ``val``.
        diagnose: ``diagnose(model, step, logger)`` after every step (and evaluation), e.g. the live
            diagnostics (:mod:`polymodal.diagnostics.live_hook`); it must leave the RNGs as it found them.
            Blocks compiled for training run eagerly inside it, as in ``evaluate``.
        should_stop: ``should_stop(step) -> bool``, asked after each evaluation (and before the
            first step of a resumed run): True ends training there, with a checkpoint (early stopping).

    Raises:
        RunInterrupted: SIGINT or SIGTERM arrived; the step under way was finished and saved.
        RunError: non-finite steps in a row, or a checkpoint that cannot be written.
    """
    train, run_dir = config.train, Path(run_dir)
    state = start_state(model, config, run_dir, resume=resume)
    log.info("training on %s, autocast %s, from step %d of %d", state.device, state.dtype or "off (fp32)", state.step, train.steps)
    # The recorder times its matmul peak (MFU's denominator) before the prefetch thread starts
    # collating: on 2 cores a collating thread beside the probe can read the peak low (BENCHMARKS.md,
    # "The main job on the EPYC with AVX-512 BF16 again").
    record = StepRecorder.start(run_dir, state, train, resume=resume, counts_skips=hasattr(collate_fn, "num_skipped"))
    batches = data_stream(dataset, collate_fn, config, state)
    trainer = data_parallel(model, state.device, gradient_surgery=state.surgery is not None)  # model itself in one process
    losses: dict[str, float] = {}
    model.train()
    stopped = any_rank(should_stop is not None and state.step > 0 and should_stop(state.step))
    try:
        with StopOnSignal() as stop, compiled_blocks(model, enabled=train.compile):  # a signal waits for the step's end
            while state.step < train.steps and not stopped:
                losses = take_step(trainer, state, batches, train, record, first=not losses)
                done = state.step == train.steps
                if evaluate is not None and ((train.eval_every > 0 and state.step % train.eval_every == 0) or done):
                    stopped = evaluate_once(model, evaluate, should_stop, record.logger, state.step)
                if diagnose is not None and is_main():
                    with torch.compiler.set_stance("force_eager"):  # a measurement, like evaluation
                        diagnose(model, state.step, record.logger)
                # After logging and evaluation, so the saved RNG state is the one the next step starts from.
                if stop.agreed() or state.step % train.ckpt_every == 0 or done or stopped:  # agreed() on every step
                    stop.raise_if_requested(state.step, state.save(run_dir, model, keep=train.keep_checkpoints))
    finally:
        batches.close()
        record.close()
    return record.result(state.step, losses)


def take_step(
    model: nn.Module, state: TrainState, batches: Prefetcher, train: TrainConfig, record: StepRecorder, *, first: bool
) -> dict[str, float]:
    """One optimiser step, counted and (every ``train.log_every`` steps, and the last) logged; its losses.

    ``first`` marks this process's first step: the loss names it reveals are checked against the
    configured weights and schedules. A fresh run's first step also counts its FLOPs (for MFU); only
    that one, because the counting dispatch mode runs other kernels (rounding differently), and a
    resumed run must repeat the uninterrupted run's steps bitwise.
    """
    lr = state.optimizer.param_groups[0]["lr"]  # the rate this step uses
    counted = state.step == 0
    with counting(enabled=counted) as flops:
        out, losses, grad_norm = optimizer_step(model, state, batches, train)
    if counted:
        record.mfu.record(flops.total, out.num_samples)
        state.flops_per_sample = record.mfu.flops_per_sample
    if first:
        warn_unused_loss_weights({**train.loss_weights, **train.loss_schedules}, out.terms)
    log_now = state.step % train.log_every == 0 or state.step == train.steps
    record.step(
        state.step, out, losses, lr=lr, grad_norm=grad_norm, skipped=batches.num_skipped, skipped_steps=state.guard.skipped, log=log_now
    )  # fmt: skip
    return losses


def evaluate_once(
    model: nn.Module, evaluate: Evaluate, should_stop: Callable[[int], bool] | None, logger: MetricsLogger, step: int
) -> bool:
    """Evaluate on every rank (each its share of the split, ``evaluation/sharding.py``; an FSDP model
    is gathered whole first), log on rank 0 and ask ``should_stop`` there; returns rank 0's answer
    on every rank, so early stopping ends them together."""
    stopped = False
    with gathered(model):
        figures = run_evaluation(model, evaluate, step)
        if is_main():
            logger.log(step, figures, prefix="val")
            stopped = should_stop is not None and should_stop(step)
    return any_rank(stopped)


def run_evaluation(model: nn.Module, evaluate: Evaluate, step: int) -> dict[str, float]:
    """``evaluate(model, step)`` in eval mode without gradients; blocks compiled for training run
    eagerly here (decoding's changing cache lengths would recompile them)."""
    model.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        figures = dict(evaluate(model, step))
    model.train()
    return figures
