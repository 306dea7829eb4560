"""The training loop's live-diagnostics hook: with ``train.diagnostics.every=N``, the fixed probe
batch (``training/probe.py``) is measured (``diagnostics/live.py``) in eval mode at every N-th
optimiser step and at the last, without touching training's random streams.

What each measurement leaves in the run folder:

- ``metrics.jsonl``: one line with ``"split": "diag"``, holding ``LiveMeasurement.scalars()``:
  ``cka/<a>-<b>/L<k>`` (cross-modal CKA of modalities a and b at layer k; L0 is the backbone's
  input), ``effective_rank/<m>``, ``conflict/<loss>/<loss>`` with ``conflict/min`` and
  ``conflict/mean`` (gradient cosines) and ``conflict_norm/<loss>``, ``experts/block<i>/<m>/entropy``
  (normalised routing entropy), ``leakage/<map>/<m>`` and ``shared_mass/<map>/<m>``, and
  ``seconds`` (what the measurement cost).
- TensorBoard: the same scalars as ``diag/<name>``, and heatmap images ``diag/cka``,
  ``diag/gradient_conflict``, ``diag/experts`` and ``diag/leakage``.
- ``diagnostics.jsonl``: one JSON object per measurement, ``{"step", "time", "seconds",
  **LiveMeasurement.record()}``: the matrices the report (``polymodal report``) draws.

A resumed run drops the entries the killed process wrote after its checkpoint, as
``MetricsLogger`` does for ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polymodal.diagnostics.live import LiveMeasurement, measure
from polymodal.modality import Modality
from polymodal.report import diagnostic_figures
from polymodal.report.figures import rgb_array
from polymodal.training.metrics_log import MetricsLogger, truncate_after
from polymodal.training.probe import (
    MIN_PROBE_ITEMS,
    PROBE_SEED_OFFSET,
    DiagnosticsSettings,
    diagnostics_settings,
    preserved_rng,
    probe_indices,
)

log = logging.getLogger(__name__)

DIAGNOSTICS_FILE = "diagnostics.jsonl"
SPLIT = "diag"
DRAWINGS = {
    "cka": lambda record: diagnostic_figures.cka_figure([("cross-modal CKA", record)]),
    "gradient_conflict": diagnostic_figures.conflict_figure,
    "experts": diagnostic_figures.experts_figure,
    "leakage": diagnostic_figures.leakage_figure,
}


class LiveDiagnostics:
    """Called by ``training.loop.fit`` after every optimiser step; measures when a step is due.

    Args:
        dataset: the validation items (``Sample``s) the probe is drawn from.
        collate_fn: list of items -> a ``Batch``.
        settings: ``train.diagnostics``.
        modalities: the modalities the model encodes (probe items carry all of them).
        seed: the run's seed (the probe's draw and the measurement's own random numbers).
        steps: the run's ``train.steps`` (the last step is always measured).
        run_dir: where ``diagnostics.jsonl`` goes.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        collate_fn: Callable[[list[Any]], Any],
        settings: DiagnosticsSettings,
        *,
        modalities: Sequence[Modality],
        seed: int,
        steps: int,
        run_dir: str | Path,
    ) -> None:
        self.dataset, self.collate_fn, self.settings = dataset, collate_fn, settings
        self.modalities, self.seed, self.steps = tuple(modalities), seed, steps
        self.path = Path(run_dir) / DIAGNOSTICS_FILE
        self.indices: list[int] | None = None  # drawn at the first measurement
        self.batches: tuple[Any, Any] | None = None
        self.started = False

    def due(self, step: int) -> bool:
        return self.settings.enabled and (step % self.settings.every == 0 or step == self.steps)

    def __call__(self, model: nn.Module, step: int, logger: MetricsLogger) -> None:
        """Measure at ``step`` if it is due and log it; otherwise nothing."""
        if not self.started:  # this process's first step: forget what a killed one wrote after it
            self.started = True
            if self.path.exists():
                truncate_after(self.path, step - 1)
        if not self.due(step):
            return
        started = time.perf_counter()
        with preserved_rng():
            result = self.measure(model)
        if result is None:
            return
        record = result.record()
        images = {tag: rgb_array(figure) for tag, draw in DRAWINGS.items() if (figure := draw(record)) is not None}
        seconds = time.perf_counter() - started  # measuring and drawing; writing is the logger's usual cost
        logger.log(step, {**result.scalars(), "seconds": seconds}, prefix=SPLIT)
        for tag, image in images.items():
            logger.log_image(f"{SPLIT}/{tag}", image, step)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "time": round(time.time(), 3), "seconds": seconds, **record}) + "\n")

    def probe(self, device: torch.device) -> tuple[Any, Any] | None:
        """The probe batch and the gradient-conflict batch (its first items), collated once."""
        if self.batches is None:
            self.indices = probe_indices(self.dataset, self.modalities, items=self.settings.items, seed=self.seed)
            if len(self.indices) < MIN_PROBE_ITEMS:
                log.warning(
                    "train.diagnostics: only %d validation items carry every modality (%s); need %d, so no "
                    "diagnostics are measured", len(self.indices), ", ".join(map(str, self.modalities)), MIN_PROBE_ITEMS,
                )  # fmt: skip
                self.settings = DiagnosticsSettings(every=0)
                return None
            items = [self.dataset[i] for i in self.indices]
            self.batches = (self.collate_fn(items), self.collate_fn(items[: self.settings.conflict_items]))
        probe, conflict = self.batches
        return probe.to(device), conflict.to(device)

    def measure(self, model: nn.Module) -> LiveMeasurement | None:
        """The measurement, in eval mode, with its own seeded random numbers (None when off)."""
        if not self.settings.enabled:
            return None
        batches = self.probe(next(model.parameters()).device)
        if batches is None:
            return None
        # The same draws at every measurement (a decoupler's random slot initialisation, say), so
        # curves move with the model only; preserved_rng puts training's streams back afterwards.
        torch.manual_seed(self.seed + PROBE_SEED_OFFSET)
        was_training = model.training
        model.eval()
        try:
            return measure(model, *batches)
        finally:
            model.train(was_training)


def live_diagnostics(run: Any, train: Any) -> LiveDiagnostics | None:
    """The hook for a training stage (``training.run.Run`` and its ``TrainConfig``), or None when
    ``train.diagnostics`` is off or the stage's model has no shared backbone to measure."""
    settings = diagnostics_settings(train.diagnostics)
    if not settings.enabled:
        return None
    model = run.model
    backbone = getattr(model, "backbone", None)
    if not hasattr(model, "encode") or not hasattr(model, "inputs") or not hasattr(backbone, "forward_intermediates"):
        log.warning("train.diagnostics: the %s has no shared backbone to measure; off for this stage", type(model).__name__)
        return None
    return LiveDiagnostics(
        run.splits.val, run.collator, settings, modalities=model.inputs.modalities, seed=run.config.seed,
        steps=train.steps, run_dir=run.run_dir,
    )  # fmt: skip
