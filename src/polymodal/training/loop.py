"""The training loop: AdamW + warmup-cosine, gradient accumulation, clipping, autocast, logging,
atomic checkpoints and exact resume (a run killed and resumed ends with the same weights, bitwise on
CPU fp32, as one never interrupted). Kept flat and readable in the manner of Karpathy's nanoGPT.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from polymodal.config import Config, dump_config
from polymodal.errors import ConfigError
from polymodal.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from polymodal.training.metrics_log import MetricsLogger
from polymodal.training.optim import build_optimizer, build_scheduler
from polymodal.training.precision import autocast, resolve_precision
from polymodal.training.sampler import build_loader

log = logging.getLogger(__name__)

Evaluate = Callable[[nn.Module, int], Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        step: optimiser steps done in total (``train.steps`` when the run completes).
        losses: the last step's ``loss`` (weighted total) and each unweighted term by name.
        wall_seconds: time spent in this call.
        samples_per_second: items trained per second in this call.
    """

    step: int
    losses: dict[str, float]
    wall_seconds: float
    samples_per_second: float


@dataclasses.dataclass(frozen=True)
class AccumulatedStep:
    """The losses of one optimiser step, averaged over its micro-batches (all detached).

    Attributes:
        total: () the weighted sum of the terms, whose gradient now sits in ``.grad``.
        terms: each unweighted () loss term by name.
        metrics: the model's metrics by name.
        num_samples: items in the micro-batches.
    """

    total: Tensor
    terms: dict[str, Tensor]
    metrics: dict[str, float]
    num_samples: int


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda[:N]`` must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: CUDA is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int,
    device: torch.device,
    dtype: torch.dtype | None,
    loss_weights: Mapping[str, float],
) -> AccumulatedStep:
    """Forward and backward over ``num_batches`` micro-batches, leaving in ``.grad`` the gradient of
    the mean over micro-batches of ``sum(loss_weights.get(name, 1) * term)``: with mean-reduced
    losses, 2 micro-batches of 16 give the gradient of one batch of 32.
    """
    total, terms, metrics, num_samples = torch.zeros((), device=device), {}, {}, 0
    for batch in itertools.islice(batches, num_batches):
        num_samples += batch.size
        batch = batch.to(device)
        with autocast(device, dtype):
            out = model(batch)
        if not out.losses:
            raise ValueError(
                f"{type(model).__name__}.forward returned no losses; StepOutput.losses must name at least one"
            )
        loss = sum(loss_weights.get(name, 1.0) * term.float() for name, term in out.losses.items())
        (loss / num_batches).backward()
        total = total + loss.detach() / num_batches
        for name, term in out.losses.items():
            terms[name] = terms.get(name, 0.0) + term.detach().float() / num_batches
        for name, value in out.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + float(value) / num_batches
    return AccumulatedStep(total, terms, metrics, num_samples)


def warn_unused_loss_weights(loss_weights: Mapping[str, float], names: Iterable[str]) -> None:
    """Log a warning for each ``train.loss_weights`` key the model's first step did not produce (a
    misspelt name would otherwise leave its loss at weight 1 without a word). A warning, not an
    error: a loss can be missing from one step (a task whose modality a batch lacks) and present in
    the next.
    """
    names = sorted(names)
    for name in sorted(set(loss_weights) - set(names)):
        log.warning("train.loss_weights names %r, which the first step did not produce; its losses: %s", name, ", ".join(names))


def fit(
    model: nn.Module,
    dataset: Dataset,
    collate_fn: Callable[[list[Any]], Any],
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    evaluate: Evaluate | None = None,
) -> FitResult:
    """Train ``model`` for ``config.train.steps`` optimiser steps, writing logs and checkpoints to ``run_dir``.

    Args:
        model: ``forward(batch)`` returns a :class:`polymodal.models.output.StepOutput`.
        dataset: items for ``collate_fn``; visited in a seeded order, one permutation per epoch.
        collate_fn: list of items -> a batch with ``.to(device)`` and ``.size``. A ``num_skipped``
            attribute (damaged samples dropped) is logged when present (counted in this process
            only, so with ``data.num_workers=0``).
        config: reads ``seed``, ``device``, ``data.num_workers`` and ``train``.
        run_dir: the run folder: ``config.yaml``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``.
        resume: continue exactly from the latest checkpoint in ``run_dir`` (weights, optimiser,
            scheduler, RNGs, data position).
        evaluate: ``evaluate(model, step) -> {name: value}``, called under ``no_grad`` in eval mode
            every ``train.eval_every`` steps (if > 0) and at the end; logged with split ``val``.
    """
    train, run_dir = config.train, Path(run_dir)
    device = resolve_device(config.device)
    dtype = resolve_precision(train.precision, device)
    seed_everything(config.seed)
    model.to(device)  # master weights stay fp32; autocast runs eligible forward ops in bf16
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    items_per_step = train.batch_size * train.grad_accum

    step, position = 0, 0
    if resume:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"resume: no checkpoint in {run_dir / 'checkpoints'}; start without resuming")
        state = load_checkpoint(found, model=model, optimizer=optimizer, scheduler=scheduler, restore_rng=True)
        step = state["step"]
        position = state.get("data_position", step * items_per_step)
    elif latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{run_dir} already holds checkpoints; resume it, or train into a new run folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    log.info("training on %s, autocast %s, from step %d of %d", device, dtype or "off (fp32)", step, train.steps)

    loader = build_loader(
        dataset, collate_fn, batch_size=train.batch_size, seed=config.seed, start=position,
        num_workers=config.data.num_workers, pin_memory=device.type == "cuda",
    )
    batches = iter(loader)
    logger = MetricsLogger(run_dir, resume_step=step if resume else None)
    bar = tqdm(
        total=train.steps, initial=step, disable=not train.progress, file=sys.stderr, unit="step", dynamic_ncols=True
    )
    max_norm = train.grad_clip if train.grad_clip > 0 else math.inf  # inf: measure the norm, never clip
    start = window_start = time.perf_counter()
    samples = window_samples = 0
    last: dict[str, float] = {}
    model.train()
    try:
        while step < train.steps:
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            out = accumulate_gradients(
                model, batches, num_batches=train.grad_accum, device=device, dtype=dtype,
                loss_weights=train.loss_weights,
            )
            terms = {name: term.item() for name, term in out.terms.items()}
            if not last:  # this process's first step: the loss names are known now
                warn_unused_loss_weights(train.loss_weights, terms)
            last = {**terms, "loss": out.total.item()}
            if not math.isfinite(last["loss"]):
                listed = ", ".join(f"{name}={value:.4g}" for name, value in terms.items())
                raise FloatingPointError(
                    f"non-finite loss at step {step + 1}: loss={last['loss']} ({listed}); lower train.lr, "
                    "check the data, or set train.precision=fp32"
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += items_per_step
            samples += out.num_samples
            window_samples += out.num_samples
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{samples / (time.perf_counter() - start):.0f}")

            if step % train.log_every == 0 or step == train.steps:
                now = time.perf_counter()
                values = {"loss": last["loss"], **{f"loss/{name}": value for name, value in terms.items()}}
                values.update(out.metrics)
                values.update(lr=lr, grad_norm=grad_norm.item(), samples_per_s=window_samples / (now - window_start))
                if hasattr(collate_fn, "num_skipped"):
                    values["skipped_samples"] = float(collate_fn.num_skipped)
                logger.log(step, values)
                window_start, window_samples = now, 0
            eval_due = (train.eval_every > 0 and step % train.eval_every == 0) or step == train.steps
            if evaluate is not None and eval_due:
                model.eval()
                with torch.no_grad():
                    logger.log(step, dict(evaluate(model, step)), prefix="val")
                model.train()
            # After logging and evaluation, so the saved RNG state is the one the next step starts from.
            if step % train.ckpt_every == 0 or step == train.steps:
                save_checkpoint(
                    run_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                    extra_state={"data_position": position}, keep=train.keep_checkpoints,
                )
    finally:
        bar.close()
        logger.close()
    wall = time.perf_counter() - start
    return FitResult(step=step, losses=last, wall_seconds=wall, samples_per_second=samples / max(wall, 1e-9))
