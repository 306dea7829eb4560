"""Checkpoint selection and early stopping by a periodic validation figure (``train.select``).

With ``train.select=audio_to_text/exact`` (a name from the figures the periodic evaluation logs
under ``val``, higher is better), every evaluation that equals or beats the best so far writes the
model's weights to ``checkpoints/best/`` (among equal figures the latest wins: a small validation
set often saturates, and the later weights have trained longer at the same figure) (``model.safetensors`` and ``best.json``: step, figure, value).
``polymodal eval`` and ``generate`` load that folder (``training.run.load_run``), and so does the
test evaluation at the end of training. With ``train.early_stop=N`` as well, training stops after
N evaluations in a row without a new best.

Nothing is held in memory between steps: every evaluation's figure is recorded in
``checkpoints/selection.json``, and each decision reads the figures of the steps before it. A run
killed and resumed from an earlier checkpoint replays the evaluations after it (dropping what the
killed run recorded past that point), so it selects and stops exactly as an uninterrupted one.
The regular ``step_*`` checkpoints keep serving resume.

Reference: early stopping on a validation set, Prechelt 1998, Early Stopping - But When?
(Neural Networks: Tricks of the Trade, LNCS 1524).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
from torch import nn

from polymodal.config import TrainConfig
from polymodal.errors import ConfigError
from polymodal.training.checkpoint import CHECKPOINT_DIR, MODEL_FILE

logger = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_FILE = "best.json"
HISTORY_FILE = "selection.json"


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / BEST_DIR


def read_best(run_dir: str | Path) -> dict | None:
    """``{"step", "figure", "value"}`` of the run's best checkpoint, or None when it has none."""
    folder = best_dir(run_dir)
    if not (folder / MODEL_FILE).is_file() or not (folder / BEST_FILE).is_file():
        return None
    return json.loads((folder / BEST_FILE).read_text())


def write_best(run_dir: str | Path, model: nn.Module, *, step: int, figure: str, value: float) -> Path:
    """The model's weights and the figure as ``checkpoints/best/``, swapped in atomically (a
    crash leaves the previous best whole)."""
    folder = best_dir(run_dir)
    tmp = folder.with_name(f".tmp-{BEST_DIR}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    safetensors.torch.save_model(model, str(tmp / MODEL_FILE), metadata={"step": str(step)})
    (tmp / BEST_FILE).write_text(json.dumps({"step": step, "figure": figure, "value": value}))
    old = folder.with_name(f".old-{BEST_DIR}-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one


class Selection:
    """Keeps the best checkpoint by ``train.select`` and says when ``train.early_stop`` ends training.

    Args:
        train: reads ``select``, ``early_stop`` and ``eval_every``.
        run_dir: the run folder (``checkpoints/best/`` goes there).
    """

    def __init__(self, train: TrainConfig, run_dir: str | Path) -> None:
        self.figure, self.patience, self.every = train.select, train.early_stop, train.eval_every
        self.run_dir = Path(run_dir)

    def history(self, before: int) -> list[tuple[int, float]]:
        """The (step, value) of the evaluations recorded before ``before``."""
        path = self.run_dir / CHECKPOINT_DIR / HISTORY_FILE
        found = json.loads(path.read_text())["history"] if path.is_file() else []
        return [(int(step), float(value)) for step, value in found if step < before]

    def observe(self, model: nn.Module, step: int, figures: Mapping[str, float]) -> None:
        """After an evaluation at ``step``: record the figure; write the best checkpoint if it equals
        or beats every earlier one."""
        if self.figure is None:
            return
        if self.figure not in figures:
            valid = ", ".join(sorted(figures)) or "none (does this run evaluate anything?)"
            raise ConfigError(f"train.select: {self.figure!r} is not a validation figure of this run; valid: {valid}")
        value = float(figures[self.figure])
        earlier = self.history(step)
        (self.run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        _write_json(self.run_dir / CHECKPOINT_DIR / HISTORY_FILE, {"figure": self.figure, "history": [*earlier, (step, value)]})
        if not earlier or value >= max(v for _, v in earlier):
            write_best(self.run_dir, model, step=step, figure=self.figure, value=value)
            logger.info("best %s so far: %.4f at step %d (checkpoints/best)", self.figure, value, step)

    def should_stop(self, step: int) -> bool:
        """True once ``early_stop`` evaluations in a row (``eval_every`` steps apart) neither beat nor
        equalled the best, as of ``step``."""
        if not self.patience or self.figure is None:
            return False
        seen = self.history(step + 1)
        if not seen:
            return False
        best_step = max(seen, key=lambda item: (item[1], item[0]))[0]  # the latest step at the best value
        if step - best_step < self.patience * self.every:
            return False
        logger.info("early stop at step %d: %s has not improved since step %d", step, self.figure, best_step)
        return True
